"""llama.cpp control vectors: write and read the GGUF files that ``--control-vector(-scaled)`` loads.

The format (llama.cpp's ``common_control_vector_load_one``, repeng's ``ControlVector.export_gguf``):
``general.architecture = "controlvector"``, ``controlvector.model_hint`` (the HF ``model_type``),
``controlvector.layer_count`` (the number of direction tensors) and one F32 1-D tensor ``direction.{i}``
of width ``d_model`` per layer ``i >= 1``. llama.cpp reads only the tensors (the keys are for people and
repeng); it rejects index 0, non-F32 and non-1-D tensors, and multiplies every tensor by the file's scale.

**Layer convention.** The vector of ``direction.{i}`` is added by llama.cpp to the output of block ``il = i``
(``build_cvec(cur, il)`` right after the block's FFN residual add), at every position. That is:

| where | the output of decoder block ``i`` (``resid_post``) |
|---|---|
| icon2_lens | layer ``i`` |
| HF transformers | ``out.hidden_states[i + 1]`` |
| TransformerLens | ``blocks.{i}.hook_resid_post`` |
| llama.cpp | ``il = i`` (``--control-vector-layer-range``) |
| GGUF tensor | ``direction.{i}`` (as repeng writes it) |

Block 0's output cannot be steered from a file (llama.cpp has no tensor for layer 0). llama.cpp's own
``cvector-generator`` reads block ``il`` but names its tensor ``direction.{il + 1}``: a one-block shift that
`read_control_vector` undoes with ``index="cvector-generator"``.

**In llama-cpp-python.** The bindings (the ``llama-cpp`` extra: ``pip install 'icon2-lens[llama-cpp]'``)
have no control-vector argument. `control_vector` does what llama.cpp's ``--control-vector-scaled
FILE:STRENGTH --control-vector-layer-range A B`` does (``common_control_vector_load`` then
``llama_set_adapter_cvec``) on a ``llama_cpp.Llama``, while active; `last_token_logits` reads the next-token
logits of a token sequence. Both import ``llama_cpp`` only when called.

This module knows nothing of `icon2_lens.directions.DirectionSet`; ``DirectionSet.export_gguf`` computes the
vectors and calls `write_control_vector`.
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from .errors import BadFileError, BadInputError, reading

__all__ = ["ControlVector", "IndexBase", "INDEX_BASES", "write_control_vector", "read_control_vector",
           "llama_cpp_command", "model_hint", "control_vector", "last_token_logits", "EXTRA"]

ARCH = "controlvector"
#: How a file's tensor index maps to a block: ``"repeng"`` (``direction.{i}`` = block ``i``: repeng, icon2_lens)
#: or ``"cvector-generator"`` (``direction.{i}`` = block ``i - 1``: llama.cpp's cvector-generator).
IndexBase = Literal["repeng", "cvector-generator"]
INDEX_BASES: tuple[str, ...] = ("repeng", "cvector-generator", "auto")
_NAME = re.compile(r"direction\.(-?\d+)")
#: The optional extra that installs llama-cpp-python (compiles llama.cpp: about 5 minutes on 2 cores).
EXTRA = "llama-cpp"
_TODO = "Export it again (`icon2-lens export`) or pass a llama.cpp control-vector GGUF."


@dataclass(frozen=True)
class ControlVector:
    """The per-block vectors of a control-vector GGUF, as read by `read_control_vector`.

    Not a `icon2_lens.directions.DirectionSet`: a GGUF holds one criterion's vectors (gamma and scale
    possibly baked in, so not unit vectors) and none of the statistics, criteria prompts or model
    fingerprint a DirectionSet needs; add ``vectors[k]`` at block ``layers[k]`` to steer with it.

    Attributes:
        layers: the decoder block of each row (the icon2_lens / HF / llama.cpp ``il`` convention), ascending.
        vectors: ``[layer, d_model]`` float32, exactly as stored (llama.cpp multiplies them by its scale).
        model_hint: ``controlvector.model_hint`` (``None`` if the file has none).
        index_base: how tensor indices were read: ``"repeng"`` (index = block) or ``"cvector-generator"``
            (index = block + 1).
        meta: the other metadata keys with string or number values (e.g. the ``icon2_lens.*`` keys).
    """

    layers: list[int]
    vectors: Float[Tensor, "layer d_model"]
    model_hint: str | None
    index_base: IndexBase
    meta: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[int, Tensor]:
        """Block -> vector (``[d_model]``)."""
        return {layer: self.vectors[k] for k, layer in enumerate(self.layers)}


def model_hint(model_meta: Mapping[str, Any]) -> str:
    """``controlvector.model_hint`` for a DirectionSet's ``meta["model"]``: the HF ``model_type`` if recorded,
    else the one transformers maps the recorded architecture to (``LlamaForCausalLM`` -> ``llama``), else
    the architecture, else the model id.

    Examples:
        >>> model_hint({"model_type": "qwen2"})
        'qwen2'
        >>> model_hint({"architecture": "LlamaForCausalLM", "model_id": "x"})
        'llama'
    """
    if model_meta.get("model_type"):
        return str(model_meta["model_type"])
    arch = model_meta.get("architecture")
    if arch:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as names

        types = [t for t, cls in names.items() if cls == arch]  # several types may share a class
        stem = str(arch).removesuffix("ForCausalLM").removesuffix("LMHeadModel").lower()
        if stem in types or len(types) == 1:
            return stem if stem in types else str(types[0])
        return str(arch)
    return str(model_meta.get("model_id") or "unknown")


def write_control_vector(path: str | os.PathLike[str], vectors: Mapping[int, Tensor], *, hint: str,
                         meta: Mapping[str, str | float | int] | None = None) -> Path:
    """Write ``direction.{block}`` tensors (F32, 1-D) and the control-vector keys to ``path``, atomically.

    ``vectors`` maps a block (>= 1, the convention in the module docs) to a ``[d_model]`` (or ``[1, d_model]``)
    vector. ``meta`` adds string/number keys (llama.cpp ignores them). The file is written to a temp file in
    the same folder and renamed over ``path``: on any error an earlier ``path`` is left as it was.

    Examples:
        >>> write_control_vector("helpful.gguf", {10: v10, 11: v11}, hint="llama")  # doctest: +SKIP
    """
    import gguf
    import numpy as np

    if not vectors:
        raise BadInputError("No layers to export; pass at least one block >= 1.", option="layers")
    arrays: dict[int, Any] = {}
    width = None
    for layer in sorted(vectors):
        if int(layer) < 1:
            raise BadInputError(f"Layer {layer} cannot be written to a llama.cpp control vector: llama.cpp has no "
                                "tensor for block 0 (it rejects direction.0); export layers >= 1.", option="layers")
        v = vectors[layer].detach().to("cpu", torch.float32).reshape(-1)
        if width is not None and v.numel() != width:
            raise BadInputError(f"Layer {layer} has width {v.numel()}, the others {width}.", option="layers")
        width = v.numel()
        arrays[int(layer)] = np.ascontiguousarray(v.numpy(), dtype=np.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_string(f"{ARCH}.model_hint", hint)
        writer.add_uint32(f"{ARCH}.layer_count", len(arrays))
        for key, value in (meta or {}).items():
            if isinstance(value, str):
                writer.add_string(key, value)
            elif isinstance(value, int) and not isinstance(value, bool):
                writer.add_int64(key, value)
            else:
                writer.add_float32(key, float(value))
        for layer, arr in arrays.items():
            writer.add_tensor(f"direction.{layer}", arr)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _field_value(f: Any) -> Any:
    """A scalar or string metadata value of a `gguf.GGUFReader` field (``None`` for arrays)."""
    import gguf

    if not f.types or f.types[0] == gguf.GGUFValueType.ARRAY:
        return None
    part = f.parts[f.data[0]]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    return part.tolist()[0]


def read_control_vector(path: str | os.PathLike[str], *, n_layers: int | None = None,
                        index: IndexBase | Literal["auto"] = "auto") -> ControlVector:
    """Read a control-vector GGUF (written by icon2_lens, repeng or llama.cpp's cvector-generator).

    Args:
        path: the ``.gguf`` file.
        n_layers: the model's number of blocks, if known: used by ``index="auto"`` and to refuse a tensor
            beyond the model.
        index: how ``direction.{i}`` maps to a block: ``"repeng"`` (block ``i``: icon2_lens and repeng write
            this), ``"cvector-generator"`` (block ``i - 1``: llama.cpp's own generator reads block ``il`` and
            names it ``direction.{il + 1}``), or ``"auto"``: shifted when some index equals ``n_layers`` (only a
            shifted file can name the block after the last), else repeng. ``auto`` cannot always tell (a shifted
            file without the last block, or no ``n_layers``, reads as repeng): when you know who wrote the file,
            say so with this option.

    Returns:
        A `ControlVector` (blocks ascending, vectors float32 as stored).

    Raises:
        BadFileError: naming the file: not a GGUF, no ``direction.*`` tensor, a tensor that is not F32 or not
            1-D, widths that differ, index 0 or below, or a block beyond ``n_layers``.

    Examples:
        >>> cv = read_control_vector("helpful.gguf", n_layers=30)  # doctest: +SKIP
        >>> cv.layers[:3], cv.vectors.shape  # doctest: +SKIP
        ([10, 11, 12], torch.Size([10, 576]))
    """
    import gguf
    import numpy as np

    if index not in INDEX_BASES:
        raise BadInputError(f"index={index!r}: use 'repeng', 'cvector-generator' or 'auto'.", option="index")
    with reading(path, what="a llama.cpp control-vector GGUF", todo=_TODO):
        reader = gguf.GGUFReader(path)
        fields = {name: _field_value(f) for name, f in reader.fields.items()}
        found: dict[int, Any] = {}
        for t in reader.tensors:
            m = _NAME.fullmatch(t.name)
            if m is None:
                continue
            i = int(m.group(1))
            if t.tensor_type != gguf.GGMLQuantizationType.F32:
                raise BadFileError(path, f"tensor {t.name} is {t.tensor_type.name}, not F32 (llama.cpp reads F32 only)",
                                   _TODO)
            if any(int(d) != 1 for d in list(t.shape)[1:]):  # ggml_n_dims != 1
                raise BadFileError(path, f"tensor {t.name} is not 1-D (shape {list(map(int, t.shape))})", _TODO)
            if i <= 0:
                raise BadFileError(path, f"tensor {t.name} has layer index {i}; llama.cpp needs indices >= 1", _TODO)
            if i in found:
                raise BadFileError(path, f"tensor {t.name} appears twice", _TODO)
            found[i] = np.array(t.data, dtype=np.float32).reshape(-1)
    if not found:
        raise BadFileError(path, "holds no direction.N tensor (not a control vector)", _TODO)
    widths = {a.shape[0] for a in found.values()}
    if len(widths) > 1:
        raise BadFileError(path, f"its direction tensors have different widths {sorted(widths)}", _TODO)
    base: IndexBase
    if index == "auto":
        base = "cvector-generator" if n_layers is not None and n_layers in found else "repeng"
    else:
        base = index
    shift = 1 if base == "cvector-generator" else 0
    layers = sorted(i - shift for i in found)
    if n_layers is not None and layers[-1] >= n_layers:
        raise BadFileError(path, f"names block {layers[-1]} (tensor direction.{layers[-1] + shift}) but the model "
                           f"has {n_layers} blocks (0..{n_layers - 1}); is the index option right (now {base!r})?",
                           _TODO)
    vectors = torch.stack([torch.from_numpy(found[layer + shift].copy()) for layer in layers])
    hint = fields.pop(f"{ARCH}.model_hint", None)
    meta = {k: v for k, v in fields.items() if v is not None and not k.startswith("GGUF.")}
    return ControlVector(layers=layers, vectors=vectors, model_hint=None if hint is None else str(hint),
                         index_base=base, meta=meta)


def llama_cpp_command(path: str | os.PathLike[str], *, layers: Sequence[int], gamma: float | None = None,
                      baked: bool = False, model: str = "MODEL.gguf", program: str = "llama-cli",
                      args: Sequence[str] = ()) -> str:
    """The llama.cpp command line (``program``: ``llama-cli``, ``llama-completion``, ``llama-server``) that
    applies the exported file at ``layers``; ``args`` are appended, shell-quoted.

    A file written without gamma (``DirectionSet.export_gguf(..., gamma=None)``: gamma 1, the scale factors
    baked in) is applied with ``--control-vector-scaled PATH:GAMMA``, which adds what ``steer(..., gamma=GAMMA)``
    adds; ``gamma=None`` leaves the placeholder ``GAMMA``. A file with gamma baked in (``baked=True``) is applied
    with ``--control-vector PATH`` (strength 1). ``--control-vector-layer-range`` is the smallest and largest
    block (inclusive; blocks in between without a tensor get nothing).

    Examples:
        >>> llama_cpp_command("h.gguf", layers=[10, 11, 12], gamma=0.1)
        'llama-cli -m MODEL.gguf --control-vector-scaled h.gguf:0.1 --control-vector-layer-range 10 12'
        >>> llama_cpp_command("h.gguf", layers=[10, 11, 12])
        'llama-cli -m MODEL.gguf --control-vector-scaled h.gguf:GAMMA --control-vector-layer-range 10 12'
        >>> llama_cpp_command("h.gguf", layers=[10, 12], baked=True)
        'llama-cli -m MODEL.gguf --control-vector h.gguf --control-vector-layer-range 10 12'
        >>> llama_cpp_command("h.gguf", layers=[10, 12], gamma=-0.1, program="llama-completion", args=["-p", "Hi!"])
        "llama-completion -m MODEL.gguf --control-vector-scaled h.gguf:-0.1 --control-vector-layer-range 10 12 -p 'Hi!'"
    """
    if not layers:
        raise BadInputError("No layers given for the llama.cpp command.", option="layers")
    if baked:
        vec = f"--control-vector {shlex.quote(str(path))}"
    else:
        vec = "--control-vector-scaled " + shlex.quote(f"{path}:{'GAMMA' if gamma is None else repr(float(gamma))}")
    cmd = f"{program} -m {shlex.quote(model)} {vec} --control-vector-layer-range {min(layers)} {max(layers)}"
    return " ".join([cmd, *(shlex.quote(str(a)) for a in args)])


def _llama_cpp() -> Any:
    """The ``llama_cpp`` module, or an ImportError naming the extra that installs it."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ImportError(f"This needs llama-cpp-python (the `{EXTRA}` extra): pip install 'icon2-lens[{EXTRA}]' "
                          "(it compiles llama.cpp: about 5 minutes on 2 cores).") from exc
    return llama_cpp


def _cvec_data(vecs: Mapping[int, Tensor], strength: float, n_embd: int) -> Any:
    """llama.cpp's control-vector buffer: ``n_embd`` floats per block from block 1 to the last given block,
    block ``il`` at row ``il - 1``, times ``strength`` (what ``common_control_vector_load`` builds)."""
    import numpy as np

    if not vecs:
        raise BadInputError("The control vector has no layers.", option="vector")
    data = np.zeros((max(int(k) for k in vecs), n_embd), dtype=np.float32)
    for layer, v in vecs.items():
        row = v.detach().to("cpu", torch.float32).reshape(-1).numpy()
        if int(layer) < 1:
            raise BadInputError(f"Block {layer} cannot take a control vector in llama.cpp (blocks 1 and up).",
                                option="vector")
        if row.shape[0] != n_embd:
            raise BadInputError(f"The vector of block {layer} has width {row.shape[0]}, the model {n_embd}: "
                                "was it exported from another model?", option="vector")
        data[int(layer) - 1] = row * float(strength)
    return np.ascontiguousarray(data.reshape(-1))


@contextmanager
def control_vector(llm: Any, vector: ControlVector | Mapping[int, Tensor] | str | os.PathLike[str], *,
                   strength: float = 1.0, layer_range: tuple[int, int] | None = None) -> Iterator[Any]:
    """Steer a llama-cpp-python ``Llama`` with a control vector while active (cleared on exit, also on error).

    The same as llama.cpp's ``--control-vector-scaled FILE:STRENGTH --control-vector-layer-range A B``: the file's
    ``direction.{il}`` times ``strength`` is added to the output of block ``il`` (for ``A <= il <= B``) at every
    position, through ``llama_set_adapter_cvec``. A file exported with ``gamma=None`` and applied with
    ``strength=GAMMA`` adds what ``icon2_lens.steer(model, dirs, criterion, GAMMA, layers=..., scale=...)`` adds.

    The ``Llama``'s state is reset on entry and exit (``llm.reset()``): llama-cpp-python reuses the key/value
    cache of a matching prompt prefix, which would have been computed with another vector. One vector at a time:
    a second ``control_vector`` on the same ``Llama`` inside the first is refused (add the vectors instead).

    Args:
        llm: a ``llama_cpp.Llama`` of the model the vector was exported from (any ``logits_all``).
        vector: a control-vector GGUF path, a `ControlVector` (`read_control_vector`) or ``{block: [d_model]}``.
        strength: the multiplier (llama.cpp's ``SCALE``; the gamma of a file exported with ``gamma=None``).
        layer_range: ``(A, B)``, inclusive; default: the smallest and largest block of the vector.

    Yields:
        ``llm``.

    Raises:
        ImportError: llama-cpp-python is not installed (the ``llama-cpp`` extra).
        BadInputError: a width other than the model's, a block outside ``1..n_layer - 1``.
        BadFileError: the file cannot be read as a control vector.

    Examples:
        >>> from llama_cpp import Llama  # doctest: +SKIP
        >>> llm = Llama("SmolLM2-135M-Instruct.Q4_1.gguf", n_ctx=2048, verbose=False)  # doctest: +SKIP
        >>> with control_vector(llm, "helpful.gguf", strength=0.1):  # doctest: +SKIP
        ...     text = llm(prompt, max_tokens=40, temperature=0.0)["choices"][0]["text"]
    """
    lib = _llama_cpp()
    n_embd, n_layer = int(llm.n_embd()), int(lib.llama_model_n_layer(llm.model))
    if isinstance(vector, (str, os.PathLike)):
        vector = read_control_vector(vector, n_layers=n_layer)
    vecs = vector.as_dict() if isinstance(vector, ControlVector) else dict(vector)
    if vecs and max(int(k) for k in vecs) >= n_layer:
        raise BadInputError(f"The control vector names block {max(int(k) for k in vecs)}; the model has blocks "
                            f"0..{n_layer - 1}.", option="vector")
    data = _cvec_data(vecs, strength, n_embd)
    start, end = layer_range if layer_range is not None else (min(int(k) for k in vecs), max(int(k) for k in vecs))
    if getattr(llm, "_icon2_lens_cvec", False):
        raise RuntimeError("A control vector is already active on this Llama; add the vectors into one instead.")
    import ctypes

    rc = lib.llama_set_adapter_cvec(llm.ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), data.size,
                                    n_embd, int(start), int(end))
    if rc != 0:
        raise RuntimeError(f"llama_set_adapter_cvec returned {rc} (blocks {start}..{end}, width {n_embd}).")
    llm._icon2_lens_cvec = True
    llm.reset()
    try:
        yield llm
    finally:
        lib.llama_set_adapter_cvec(llm.ctx, None, 0, n_embd, 0, 0)
        llm._icon2_lens_cvec = False
        llm.reset()


def last_token_logits(llm: Any, tokens: Sequence[int]) -> Float[Tensor, " vocab"]:
    """The next-token logits after ``tokens`` (float32, CPU), evaluated from a fresh state in a ``Llama``.

    Reads ``llama_get_logits_ith(ctx, -1)`` right after the evaluation, so it works whatever ``logits_all``
    is (``Llama.scores`` is filled only with ``logits_all=True``: reading it otherwise gives stale rows).

    Examples:
        >>> ids = llm.tokenize(text.encode(), add_bos=False, special=True)  # doctest: +SKIP
        >>> with control_vector(llm, "helpful.gguf", strength=0.1):  # doctest: +SKIP
        ...     steered = last_token_logits(llm, ids)
    """
    import numpy as np

    lib = _llama_cpp()
    if not tokens:
        raise BadInputError("No tokens to evaluate.", option="tokens")
    llm.reset()
    llm.eval(list(tokens))
    ptr = lib.llama_get_logits_ith(llm.ctx, -1)
    return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(int(llm.n_vocab()),)).astype(np.float32))
