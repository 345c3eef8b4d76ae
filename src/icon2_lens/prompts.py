"""Chat-template rendering: criterion stimuli, scoring input, response reading.

Everything goes through the tokenizer's own chat template (no hand-written per-model
templates). A model without a chat template gets a clear error; pass ``chat_template=`` to
`icon2_lens.load_model` to give it one.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["render_chat", "stimulus_texts", "require_chat_template"]


def require_chat_template(tokenizer: Any) -> None:
    """Raise a clear error if ``tokenizer`` has no chat template.

    Examples:
        >>> require_chat_template(model.tokenizer)  # doctest: +SKIP
    """
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "this model")
        raise ValueError(
            f"The tokenizer of {name!r} has no chat template, so system prompts and the assistant turn "
            "cannot be rendered. Use an instruct/chat model, or pass a template explicitly: "
            "load_model(source, chat_template='...jinja...') (CLI: --chat-template FILE)."
        )


def render_chat(
    tokenizer: Any,
    user: str,
    *,
    system: str | None = None,
    assistant: str | None = None,
) -> str:
    """Render one conversation turn as text, ready to tokenize without special tokens.

    Args:
        tokenizer: a tokenizer with a chat template.
        user: the user message.
        system: a system prompt; ``None`` renders no system message (a template may still insert its
            own default one, as SmolLM2's does: that is the model's natural "no system prompt" state).
        assistant: if given, the text ends right after this assistant message's content (no
            end-of-turn token); otherwise it ends with the generation prompt (assistant-turn start).

    Examples:
        >>> render_chat(tok, "Hi", system="You are a helpful assistant.")  # doctest: +SKIP
        '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    require_chat_template(tokenizer)
    messages: list[dict[str, str]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": user})
    if assistant is None:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": assistant})
    return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)


def stimulus_texts(tokenizer: Any, system: str, instructions: Sequence[str]) -> list[str]:
    """Each instruction rendered after one system prompt, ending at the assistant-turn start.

    Examples:
        >>> stimulus_texts(tok, "You are a helpful assistant.", ["Hi"])  # doctest: +SKIP
    """
    return [render_chat(tokenizer, d, system=system) for d in instructions]
