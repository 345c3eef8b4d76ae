"""The HF engine: HF ``generate`` on a plain HF model that shares the bridge's weights (the fast path).

``generate`` through the bridge (or through the HF model it rewrote in place) runs its wrapped
modules and eager attention, measured 3-4x slower on SmolLM2. This engine builds a plain HF
``AutoModelForCausalLM`` on the meta device from the config and gives it the bridge's own parameter
and buffer tensors (no copy, no extra weight memory), so it computes the same function with HF's
fast path. This is the one place that does it. When the bridge's module names cannot be mapped back
to HF's, it loads a second copy instead and says so (with the memory the copy costs): never silently.

Steering is torch forward hooks on the decoder layers: ``resid_post`` of layer ``l`` is the output of
decoder layer ``l``, ``resid_pre`` its input.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from functools import cached_property
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..models import LoadedModel
from .base import Decoding, Generation, Seed, SteerSpec, stop_ids
from .batching import LogitScoring, RowGumbel, decode_rows, encode, pad_id, padded_batch, position_ids, seeded
from .hooks import SteerAdder

__all__ = ["HFEngine", "shared_hf_model", "decoder_layers"]


def shared_hf_model(model: LoadedModel) -> Any | None:
    """A fresh HF model whose parameters and buffers are the tensors of the bridge's HF model.

    The bridge inserts ``_original_component`` into module paths; stripping it gives HF's names.
    Returns ``None`` when some tensor of the HF model has no counterpart.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    wrapped = model.bridge.original_model

    def hf_name(name: str) -> str:
        return name.replace("._original_component", "").replace("_original_component.", "")

    config = AutoConfig.from_pretrained(model.info.hf_path, local_files_only=model.local_files_only)
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=next(wrapped.parameters()).dtype)
    source = {hf_name(k): v for k, v in wrapped.named_parameters(remove_duplicate=False)}
    source.update({hf_name(k): v for k, v in wrapped.named_buffers(remove_duplicate=False)})
    for kind in ("parameters", "buffers"):
        for name, _ in list(getattr(fresh, f"named_{kind}")(remove_duplicate=False)):
            if name not in source:
                return None
            module_name, _, attr = name.rpartition(".")
            module = fresh.get_submodule(module_name)
            tensor = source[name]
            if kind == "parameters":
                module._parameters[attr] = tensor if isinstance(tensor, torch.nn.Parameter) else torch.nn.Parameter(
                    tensor, requires_grad=False)
            else:
                module._buffers[attr] = tensor
    if any(t.is_meta for t in [*fresh.parameters(), *fresh.buffers()]):
        return None
    return fresh


def decoder_layers(hf: Any) -> Any:
    """The list of decoder layers of an HF causal LM (``model.layers`` for Llama-like models)."""
    base = getattr(hf, "base_model", hf)
    for attr in ("layers", "h", "blocks"):
        if hasattr(base, attr):
            return getattr(base, attr)
    decoder = getattr(base, "decoder", None)
    if decoder is not None and hasattr(decoder, "layers"):
        return decoder.layers
    raise ValueError(f"Cannot find the decoder layers of {type(hf).__name__}; use the bridge engine.")


class HFEngine(LogitScoring):
    """The fast `icon2_lens.gen.Generator`: HF ``generate`` with torch forward hooks for steering.

    Made once per `LoadedModel` by `icon2_lens.gen.engine` (kept on the model). Inference only.

    Attributes:
        hf_model: the plain HF model (shares the bridge's weights when ``shared``).
        shared: whether the weights are shared (``False``: a second copy was loaded, with a warning).

    Examples:
        >>> eng = il.gen.engine(model)  # doctest: +SKIP
        >>> eng.generate([il.render_chat(model.tokenizer, "Hi")], il.gen.Decoding(max_new_tokens=8))  # doctest: +SKIP
    """

    name = "hf"

    def __init__(self, model: LoadedModel, *, hf_model: Any | None = None) -> None:
        self.model, self.tokenizer = model, model.tokenizer
        hf = hf_model if hf_model is not None else shared_hf_model(model)  # given: one `shared_hf_model` built
        self.shared = hf is not None
        if hf is None:
            hf = model.hf_model()
            mib = sum(p.numel() * p.element_size() for p in hf.parameters()) / 2**20
            warnings.warn(
                f"The bridge's weights of {model.info.model_id} could not be mapped onto a plain HF model, so the fast "
                f"generation path loaded a second copy of the weights ({mib:.0f} MiB more memory). Generation is "
                "unchanged; to avoid the copy, use the bridge engine (engine='bridge', slower).", stacklevel=2)
        hf.eval()
        self.hf_model = hf

    @cached_property
    def stop_ids(self) -> list[int]:
        """The default stop of `generate`: the chat template's end-of-turn token and EOS (worked out once)."""
        return stop_ids(self.tokenizer)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return next(self.hf_model.parameters()).device

    @contextmanager
    def steering(self, spec: SteerSpec) -> Iterator[list[SteerAdder]]:
        """Add ``spec`` to the decoder layers while inside; hooks are removed on exit, also on error."""
        spec.check_layers(self.model.n_layers, self.model.info.model_id)
        layers = decoder_layers(self.hf_model)
        adders: list[SteerAdder] = []
        with ExitStack() as stack:
            for layer in spec.layers:
                add = SteerAdder(spec.vectors[layer], positions=spec.positions)
                adders.append(add)
                if spec.hook == "resid_post":
                    def post(_mod: Any, _args: Any, output: Any, add: SteerAdder = add) -> Any:
                        if isinstance(output, tuple):
                            return (add(output[0]), *output[1:])
                        return add(output)

                    handle = layers[layer].register_forward_hook(post)
                else:
                    def pre(_mod: Any, args: Any, kwargs: Any, add: SteerAdder = add) -> Any:
                        if args:
                            return (add(args[0]), *args[1:]), kwargs
                        kwargs = dict(kwargs)
                        kwargs["hidden_states"] = add(kwargs["hidden_states"])
                        return args, kwargs

                    handle = layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
                stack.callback(handle.remove)
            yield adders

    def generate(self, prompts: Sequence[str], decoding: Decoding, *, steer: SteerSpec | None = None,
                 seed: Seed = 0, stop: Sequence[int] | None = None) -> list[Generation]:
        """Generate one response per prompt, left-padded into one batch.

        Args:
            prompts: rendered prompts (chat template applied).
            decoding: the `Decoding` settings.
            steer: vectors to add while generating (one row, or one per prompt).
            seed: an int seeds the batch's RNG stream; a sequence gives each row its own stream (a row's
                sample then does not depend on the batch it is in). The caller's RNG is untouched.
            stop: token ids that end a response (default: end-of-turn and EOS).

        Returns:
            One `Generation` per prompt.
        """
        tok = self.tokenizer
        ids = encode(tok, prompts)
        input_ids, mask = padded_batch(tok, ids, self.device)
        stop = list(stop) if stop is not None else self.stop_ids
        kwargs: dict[str, Any] = {"attention_mask": mask, "max_new_tokens": decoding.max_new_tokens,
                                  "do_sample": decoding.do_sample, "repetition_penalty": decoding.repetition_penalty,
                                  "eos_token_id": stop, "pad_token_id": pad_id(tok), "use_cache": True}
        per_row = not isinstance(seed, int)
        if decoding.do_sample and per_row:
            from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

            seeds = list(seed)  # type: ignore[arg-type]
            if len(seeds) != len(prompts):
                raise ValueError(f"Got {len(seeds)} row seeds for {len(prompts)} prompts; give one per prompt.")
            procs: list[Any] = [TemperatureLogitsWarper(decoding.temperature)]
            if decoding.top_p < 1:
                procs.append(TopPLogitsWarper(decoding.top_p))
            kwargs.update(do_sample=False, logits_processor=LogitsProcessorList([*procs, RowGumbel(seeds)]))
        elif decoding.do_sample:
            kwargs.update(temperature=decoding.temperature, top_p=decoding.top_p, top_k=0)
        if steer is not None and steer.rows not in (1, len(prompts)):
            raise ValueError(f"Per-row steering has {steer.rows} rows but there are {len(prompts)} prompts.")
        with seeded(seed if isinstance(seed, int) else 0, self.device), torch.inference_mode(), \
                (self.steering(steer) if steer is not None else nullcontext()):
            out = self.hf_model.generate(input_ids, **kwargs)
        return decode_rows(tok, out[:, input_ids.shape[1]:], stop)

    def forward_logits(self, input_ids: Tensor, mask: Tensor) -> Float[Tensor, "batch width vocab"]:
        """Logits of a left-padded batch (position ids from the mask)."""
        return self.hf_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask)).logits
