"""Shared fixtures: a tiny random Llama built through the public load path, and the embedded model.

The tiny model has a byte-level BPE tokenizer built in code (so any text tokenises), a ChatML
chat template, 4 layers and d_model 64. It is saved with ``save_pretrained`` and loaded with
``icon2_lens.load_model(folder)``: the same code path as a real HF folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

CHATML = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "<|im_start|>", "<|im_end|>"]

# A few words so the BPE learns some merges; the byte-level alphabet covers everything else.
_CORPUS = [
    "You are a helpful assistant.",
    "You are a helpless assistant.",
    "You are an honest assistant.",
    "You are a dishonest assistant.",
    "You are a harmless assistant.",
    "You are a harmful assistant.",
    "Write a haiku about the sea.",
    "Explain how DNS works.",
    "What is the capital of France?",
    "system user assistant",
]


def build_tokenizer(chat_template: str | None = CHATML):
    """A byte-level BPE ``PreTrainedTokenizerFast`` built in code (deterministic, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from icon2_lens.instructions import builtin_instructions

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS + builtin_instructions()[:64], trainer=trainer)
    # Like many real tokenizers, it adds a BOS when asked for special tokens, and the chat template
    # starts with the same BOS: chat text must be tokenised without special tokens (no doubled BOS).
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<s>",
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def build_model_folder(folder: Path, *, chat_template: str | None = CHATML, hidden_size: int = 64,
                       num_hidden_layers: int = 4, seed: int = 0) -> Path:
    """Save a tiny random Llama + tokenizer into ``folder`` (an HF folder load_model accepts)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(chat_template)
    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def talker_dir(tmp_path_factory) -> Path:
    """Folder of a tiny Llama that ends its turn often when sampling (about half the time).

    The plain random tiny model almost never samples its end-of-turn token, so nearly every
    generation is truncated; here a constant embedding dimension feeds the ``<|im_end|>`` logit.
    """
    from transformers import LlamaForCausalLM

    folder = build_model_folder(tmp_path_factory.mktemp("models") / "tiny-talker")
    hf = LlamaForCausalLM.from_pretrained(folder)
    end = build_tokenizer().convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        hf.model.embed_tokens.weight[:, 0] = 1.0
        hf.lm_head.weight[:, 0] = 0.0
        hf.lm_head.weight[end, 0] = 0.5
    hf.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def talker(talker_dir):
    """The talker model loaded through ``icon2_lens.load_model``."""
    import icon2_lens as il

    return il.load_model(talker_dir, device="cpu")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One torch thread for the whole session. On a busy 2-core machine two threads were measured 2-10x
    slower than one (thread hand-off dominates: tiny model 10x, SmolLM2 batches 2-5x); on an idle
    machine one thread costs SmolLM2 at most ~2x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Folder of the tiny random Llama with a ChatML chat template."""
    return build_model_folder(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """The tiny Llama loaded through ``icon2_lens.load_model`` (TransformerBridge, CPU)."""
    import icon2_lens as il

    return il.load_model(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_model_no_template_dir(tmp_path_factory) -> Path:
    """Folder of a tiny random Llama whose tokenizer has no chat template (a base model)."""
    return build_model_folder(tmp_path_factory.mktemp("models") / "tiny-base", chat_template=None)


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory):
    """A second tiny Llama of another shape (d_model 32, 3 layers), for mismatch checks."""
    import icon2_lens as il

    folder = build_model_folder(tmp_path_factory.mktemp("models") / "tiny-other", hidden_size=32,
                                num_hidden_layers=3, seed=1)
    return il.load_model(folder, device="cpu")


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M-Instruct (integration tests only)."""
    import icon2_lens as il

    return il.load_model(device="cpu")


# A small feature set for extraction on the tiny model.
INSTRUCTIONS = [
    "Write a haiku about the sea.",
    "Explain how DNS works.",
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Summarise the plot of Hamlet in two sentences.",
    "How do I reverse a list in Python?",
]

# Prompts of clearly different token lengths, for padding checks.
PROMPTS = [
    "Hi",
    "Write a haiku about the sea.",
    "Explain, step by step and with an example, how DNS resolves a name to an address.",
    "What is 2+2?",
    "Zxqv ünïcødé 🙂 words the tokenizer never saw",
]


@pytest.fixture(scope="session")
def chat_prompts(tiny_model) -> list[str]:
    """PROMPTS rendered with the tiny model's chat template and a system prompt."""
    import icon2_lens as il

    return [il.render_chat(tiny_model.tokenizer, p, system="You are a helpful assistant.") for p in PROMPTS]


def write_bert_gguf(path: Path) -> Path:
    """Write a GGUF file of an encoder (bert), not a causal LM, at ``path`` (for bad-input tests)."""
    import gguf
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
