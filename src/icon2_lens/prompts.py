"""Chat-template rendering: criterion stimuli, scoring input, response reading.

Everything goes through the tokenizer's own chat template (no hand-written per-model
templates). A model without a chat template gets a clear error; pass ``chat_template=`` to
`icon2_lens.load_model` to give it one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "render_chat",
    "stimulus_texts",
    "require_chat_template",
    "pre_query_template",
    "PreQuery",
    "scoring_texts",
]


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


def _messages(system: str | None, user: str) -> list[dict[str, str]]:
    """A system message (if given) and a user message, in chat-template form."""
    head = [{"role": "system", "content": system}] if system is not None else []
    return [*head, {"role": "user", "content": user}]


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
        >>> render_chat(tok, "Hi", system="Be brief.")  # doctest: +SKIP
        '<|im_start|>system\\nBe brief.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    require_chat_template(tokenizer)
    messages = _messages(system, user)
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


_SENTINEL = "XqzSentinelUserTextQzx"


@dataclass(frozen=True)
class PreQuery:
    """The chat template cut where the user's words go (Magpie's pre-query template).

    Attributes:
        prefix: rendered text up to (not including) the user message, e.g. for ChatML
            ``"<|im_start|>system\n...<|im_end|>\n<|im_start|>user\n"``.
        end_of_turn: the text the template puts right after a user message (e.g. ``"<|im_end|>\n"``).
        end_of_turn_id: the first special token in ``end_of_turn`` (or its only token): generation of
            the user turn stops there.
    """

    prefix: str
    end_of_turn: str
    end_of_turn_id: int


def pre_query_template(tokenizer: Any, *, system_prompt: str | None = None) -> PreQuery:
    """Cut the tokenizer's own chat template right before the user's text.

    A conversation with one sentinel user message (after ``system_prompt`` if given) is rendered
    without a generation prompt and cut before the sentinel, so a default system prompt that the
    template inserts by itself (SmolLM2's, Llama-3's date header) is kept. No per-model templates.

    Examples:
        >>> pq = pre_query_template(tok)  # doctest: +SKIP
        >>> pq.prefix  # doctest: +SKIP
        '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\n<|im_start|>user\n'
    """
    require_chat_template(tokenizer)
    text = tokenizer.apply_chat_template(_messages(system_prompt, _SENTINEL), tokenize=False,
                                         add_generation_prompt=False)
    if text.count(_SENTINEL) != 1:
        raise ValueError(
            "The chat template does not render the user message verbatim exactly once, so the pre-query "
            "template cannot be cut from it; pass a model whose template does (or a chat_template= to load_model)."
        )
    prefix, after = text.split(_SENTINEL)
    suffix_ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    stop = next((int(t) for t in suffix_ids if t in special), None)  # e.g. <|im_end|>, <|eot_id|>, [/INST]
    if stop is None:
        stripped = tokenizer(after.strip(), add_special_tokens=False)["input_ids"] if after.strip() else []
        if len(stripped) == 1:  # a single ordinary token that marks the end (not a bare space)
            stop = int(stripped[0])
    if stop is None:
        raise ValueError(
            f"The chat template puts {after!r} after the user message, which is not one end-of-turn token, so "
            "generation of the user turn has nothing to stop at; pass a chat template whose user turn ends "
            "with a special token (load_model(..., chat_template=...))."
        )
    return PreQuery(prefix=prefix, end_of_turn=after, end_of_turn_id=stop)


#: How `scoring_texts` renders an instruction: through the chat template or as plain text.
Render = Literal["chat", "raw"]


def scoring_texts(
    tokenizer: Any, instructions: Sequence[str], *, render: Render = "chat", system_prompt: str | None = None
) -> list[str]:
    """The texts read to score instructions (METHOD.md section 3: no system prompt).

    ``render="chat"`` (default): the instruction as the user message, ending at the assistant-turn
    start (generation prompt). No system message is passed, so a template that inserts a default
    system prompt when none is given (SmolLM2: "You are a helpful AI assistant named SmolLM ...")
    keeps it: that is the state the model answers from when a user gives no system prompt, and
    the same convention as the layer report's response reading. ``system_prompt`` replaces it
    (``""`` gives an empty system message). ``render="raw"``: the instruction text alone (after the
    BOS token, if the tokenizer adds one by default).

    Examples:
        >>> scoring_texts(tok, ["Name a river."], render="raw")  # doctest: +SKIP
        ['Name a river.']
    """
    if render == "raw":
        if system_prompt is not None:
            raise ValueError("system_prompt needs render='chat'; raw text has no system message.")
        bos = getattr(tokenizer, "bos_token", None)
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
        adds_bos = bool(bos) and len(ids) > 0 and ids[0] == tokenizer.bos_token_id
        return [f"{bos}{d}" if adds_bos else d for d in instructions]  # the BOS the tokenizer would add, once
    if render != "chat":
        raise ValueError(f"Unknown render {render!r}; use 'chat' or 'raw'.")
    return [render_chat(tokenizer, d, system=system_prompt) for d in instructions]
