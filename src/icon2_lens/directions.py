"""Direction vectors: one unit vector per criterion and layer, computed from contrast pairs.

For each criterion and feature instruction ``d`` the model reads ``d`` after the positive and
after the negative system prompt; the last-token residuals ``h+`` and ``h-`` give a difference
``h+ - h-`` per layer. A direction is the first principal component of those differences
(``pca``, RepE-style, uncentred), of the centred differences (``pca_centered``), or their mean
(``mean_diff``); its sign is fixed so that the mean difference projects positively.

The statistics are accumulated in a streaming way (sums and ``d_model x d_model`` second
moments per layer), so extraction memory does not grow with the number of instructions. That math
(`ContrastAccumulator`, the direction methods and their registry) is in `icon2_lens.math.contrast`;
this module reads the model and stores the result.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from .activations import HookKind, tokenize_texts
from .criteria import Criterion, resolve_criteria
from .errors import BadFileError, BadInputError, read_json, reading
from .gen.prefix import PrefixReader, last_token_reader
from .instructions import load_instructions
from .llama_cpp import model_hint, write_control_vector
from .math.contrast import (
    STAT_NAMES,  # also re-exported: icon2_lens.directions.STAT_NAMES
    ContrastAccumulator,
    Method,
    Storage,
    cosine_per_layer,
    directions_from_activations,
    finish_directions,
    get_direction_method,
    split_halves,
)
from .models import LoadedModel
from .prompts import require_chat_template, stimulus_texts
from .runs.io import atomic_folder, atomic_write_text

__all__ = [
    "ExtractConfig",
    "Method",
    "ContrastAccumulator",
    "DirectionSet",
    "directions_from_activations",
    "extract_directions",
    "finish_directions",
    "accumulate_contrasts",
    "instruction_hash",
    "versions",
    "steering_vectors",
    "Scale",
    "SCALES",
]


@dataclass(frozen=True, kw_only=True)
class ExtractConfig:
    """Settings of `extract_directions`: the one source of their defaults (library, CLI and pipeline).

    Attributes:
        method: direction method (a name in `icon2_lens.math.contrast.DIRECTION_METHODS`).
        hook: residual hook kind read at every layer.
        batch_size: prompts per forward pass.
        stability: also measure split-half stability in the same pass.
    """

    method: str = "pca"
    hook: str = "resid_post"
    batch_size: int = 32
    stability: bool = False

    def __post_init__(self) -> None:
        get_direction_method(self.method)  # an unknown method is an error naming the registered ones
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}.")


_FORMAT = "icon2_lens.directions/1"


def instruction_hash(text: str) -> str:
    """Short stable hash of an instruction (12 hex digits), used to record which were used.

    Examples:
        >>> len(instruction_hash("Write a haiku."))
        12
    """
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()[:12]


def versions() -> dict[str, str]:
    """Versions of the libraries that shape the numbers (recorded in metadata).

    Examples:
        >>> "torch" in versions()
        True
    """
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("icon2-lens", "torch", "transformers", "transformer-lens"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _tensor_problem(vectors: Any, criteria: Sequence[str], stats: dict[str, Any]) -> str | None:
    """What makes a DirectionSet's tensors unusable (a wrong shape, NaN or infinity), or ``None``."""
    if not isinstance(vectors, Tensor) or vectors.dim() != 3:
        shape = list(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__
        return f"vectors must be a [criterion, layer, d_model] tensor, got {shape}"
    if len(criteria) != vectors.shape[0]:
        return f"{len(criteria)} criterion names for {vectors.shape[0]} rows of vectors"
    for i, name in enumerate(criteria):
        if not bool(torch.isfinite(vectors[i]).all()):
            return f"the vectors of criterion {name!r} hold NaN or infinite values"
    for key, t in stats.items():
        if not isinstance(t, Tensor) or t.dim() < 1 or t.shape[0] != vectors.shape[0]:
            return f"statistic {key!r} is not a [criterion, layer] tensor"
        for i, name in enumerate(criteria):
            if not bool(torch.isfinite(t[i]).all()):
                return f"statistic {key!r} of criterion {name!r} holds NaN or infinite values"
    return None


@dataclass(frozen=True)
class DirectionSet:
    """Unit direction vectors per criterion and layer, with statistics and metadata.

    Attributes:
        vectors: ``[criterion, layer, d_model]`` unit vectors (float32, CPU).
        criteria: criterion names, in the order of ``vectors``.
        stats: per-layer statistics, each ``[criterion, layer]``: ``resid_norm`` (mean residual norm at
            the read position), ``diff_norm`` (mean ``|h+ - h-|``), ``explained_variance`` (share of the
            differences' squared norm along the direction), ``proj_mean`` / ``proj_std`` (projection of
            the feature-set activations, both prompts pooled), ``proj_gap`` (mean projection of ``h+ - h-``).
        meta: criteria prompts, layers, hook, method, counts, model id and fingerprint, versions,
            and ``suggested_layers`` once a layer report has run.

    Examples:
        >>> dirs = il.extract_directions(model, il.DEFAULT_CRITERIA, "default")  # doctest: +SKIP
        >>> dirs.vector("helpful").shape  # doctest: +SKIP
        torch.Size([30, 576])
    """

    vectors: Float[Tensor, "criterion layer d_model"]
    criteria: list[str]
    stats: dict[str, Float[Tensor, "criterion layer"]]
    meta: dict[str, Any]

    def __post_init__(self) -> None:
        problem = _tensor_problem(self.vectors, self.criteria, self.stats)
        if problem is not None:
            raise BadInputError(f"DirectionSet: {problem}; extract the directions again (`icon2-lens extract`).",
                                option="directions")

    # ---- access -------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        """Model layer index of each row of ``vectors[c]``."""
        return list(self.meta["layers"])

    @property
    def hook(self) -> str:
        """Residual hook kind the vectors were read at (e.g. ``resid_post``)."""
        return str(self.meta["hook"])

    @property
    def suggested_layers(self) -> list[int] | None:
        """Steering layer range suggested by the layer report (``None`` before one ran)."""
        s = self.meta.get("suggested_layers")
        return None if s is None else list(s)

    @property
    def criterion_defs(self) -> list[Criterion]:
        """The criteria (with their prompts) the vectors were extracted for."""
        return [Criterion(**c) for c in self.meta["criteria"]]

    def index(self, criterion: str) -> int:
        """Row of ``criterion`` in ``vectors``; a clear error if it is missing."""
        if criterion not in self.criteria:
            raise KeyError(f"Criterion {criterion!r} is not in these directions; available: {self.criteria}.")
        return self.criteria.index(criterion)

    def vector(self, criterion: str) -> Float[Tensor, "layer d_model"]:
        """The unit vectors of one criterion, one per layer."""
        return self.vectors[self.index(criterion)]

    def stat(self, name: str, criterion: str) -> Float[Tensor, " layer"]:
        """One per-layer statistic of one criterion (see `stats`)."""
        if name not in self.stats:
            raise KeyError(f"Unknown statistic {name!r}; available: {sorted(self.stats)}.")
        return self.stats[name][self.index(criterion)]

    def criterion_cosines(self) -> Float[Tensor, "layer criterion criterion"]:
        """Cosine similarity between the criteria's directions at each layer."""
        v = self.vectors.transpose(0, 1)  # [layer, C, d]
        return v @ v.transpose(1, 2)

    def response_separation(self, layers: Sequence[int] | None = None) -> dict[str, float | None]:
        """Per criterion: the layer report's measure (c) averaged over ``layers`` (default: the suggested range).

        (c) is the share of held-out human-written response pairs (a good and a bad answer to the same
        question) whose reading orders the good one above the bad one along the criterion's direction:
        0.5 is chance, below 0.5 the direction reads backwards. ``None`` for a criterion without response
        pairs; an empty dict before a layer report has run (`icon2_lens.layer_report(...).apply(dirs)`).

        Examples:
            >>> dirs.response_separation()  # doctest: +SKIP
            {'general': 0.84, 'helpful': 0.81, 'honest': 0.66, 'harmless': 0.06}
        """
        rep = self.meta.get("layer_report")
        if not rep:
            return {}
        want = list(layers) if layers is not None else (self.suggested_layers or list(rep["layers"]))
        cols = [rep["layers"].index(x) for x in want if x in rep["layers"]]
        out: dict[str, float | None] = {}
        for i, c in enumerate(rep["criteria"]):
            vals = [rep["response"][i][j] for j in cols]
            vals = [v for v in vals if v is not None]
            out[c] = sum(vals) / len(vals) if vals else None
        return out

    def with_meta(self, **updates: Any) -> DirectionSet:
        """A copy with metadata keys updated (the caller's object is not changed)."""
        return replace(self, meta={**self.meta, **updates})

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"DirectionSet(criteria={self.criteria}, layers={len(self.layers)}, d_model={self.vectors.shape[-1]}, "
            f"method={m.get('method')}, hook={m.get('hook')}, n={m.get('n_instructions')}, "
            f"model={m.get('model', {}).get('model_id')}, suggested_layers={self.suggested_layers})"
        )

    # ---- llama.cpp ----------------------------------------------------------------------------
    def export_gguf(self, path: str | Path, criterion: str, *, layers: Sequence[int] | range | None = None,
                    gamma: float | None = None, scale: Scale = "relative") -> Path:
        """Write one criterion's steering vectors as a llama.cpp control-vector GGUF (atomically); return ``path``.

        The file holds one F32 tensor ``direction.{i}`` per exported layer ``i`` (repeng's format, with
        ``general.architecture = "controlvector"``, ``controlvector.model_hint`` and ``controlvector.layer_count``).
        Layer convention: our layer ``i`` (the output of block ``i``) = HF ``hidden_states[i + 1]`` =
        TransformerLens ``blocks.{i}.hook_resid_post`` = llama.cpp ``il = i`` = tensor ``direction.{i}``
        (`icon2_lens.llama_cpp`). llama.cpp adds a control vector at block outputs only, so only ``resid_post``
        directions can be exported, and never layer 0 (llama.cpp has no tensor for it).

        Args:
            path: the ``.gguf`` file to write (an earlier file is replaced only once the new one is complete).
            criterion: the criterion whose vectors are written.
            layers: the layers (all >= 1); default: the suggested steering layers if set, else every layer >= 1.
            gamma: ``None`` (default): the vectors for gamma 1 with the ``scale`` factors baked in, so that
                llama.cpp's ``--control-vector-scaled FILE:GAMMA`` adds exactly what ``steer(..., gamma=GAMMA,
                scale=scale, layers=layers)`` adds (llama.cpp multiplies the whole file by GAMMA). A number: that
                gamma baked in too (apply with ``--control-vector FILE``).
            scale: what gamma is measured in (`icon2_lens.steering`): ``"relative"``, ``"unit"`` or ``"contrast"``.

        Returns:
            ``path``. `icon2_lens.llama_cpp.llama_cpp_command` gives the llama.cpp command line.

        Examples:
            >>> dirs.export_gguf("helpful.gguf", "helpful", layers=range(10, 20))  # doctest: +SKIP
            PosixPath('helpful.gguf')
        """
        from .activations import hook_kind

        if hook_kind(self.hook) != "resid_post":
            raise BadInputError(f"These directions were read at {self.hook!r}; llama.cpp adds control vectors to "
                                "block outputs (resid_post) only. Extract them with hook resid_post (`icon2-lens "
                                "extract --hook resid_post`) to export.", option="directions")
        chosen = self.export_layers(layers)
        if gamma is not None and (isinstance(gamma, bool) or not isinstance(gamma, (int, float))
                                  or not torch.isfinite(torch.tensor(float(gamma)))):
            raise BadInputError(f"gamma={gamma!r} is not a finite number; give a number or None.", option="gamma")
        vecs = steering_vectors(self, criterion, 1.0 if gamma is None else float(gamma), layers=chosen, scale=scale)
        model = self.meta.get("model") or {}
        meta: dict[str, str | float | int] = {"icon2_lens.criterion": criterion, "icon2_lens.scale": scale,
                                              "icon2_lens.hook": self.hook,
                                              "icon2_lens.model_id": str(model.get("model_id") or "unknown")}
        if gamma is not None:
            meta["icon2_lens.gamma"] = float(gamma)
        return write_control_vector(path, {k: v[0] for k, v in vecs.items()}, hint=model_hint(model), meta=meta)

    def export_layers(self, layers: Sequence[int] | range | None = None) -> list[int]:
        """The layers `export_gguf` writes for ``layers`` (``None``: suggested, else all >= 1); refuses layer 0.

        Examples:
            >>> dirs.export_layers(None)  # doctest: +SKIP
            [15, 16, 17, 18, 19, 20, 21, 22, 23, 24]
        """
        if layers is None:
            chosen = self.suggested_layers or [x for x in self.layers if x >= 1]
        else:
            chosen = [int(x) for x in layers]
        if any(x <= 0 for x in chosen):
            raise BadInputError(f"Layer {min(chosen)} cannot be exported: llama.cpp adds control vectors at the "
                                "outputs of blocks 1 and up (it has no tensor for block 0). Pass layers >= 1.",
                                option="layers")
        if not chosen:
            raise BadInputError("No layers >= 1 to export; pass layers=.", option="layers")
        return chosen

    # ---- compatibility --------------------------------------------------------------------
    def check_compatible(self, model: LoadedModel) -> None:
        """Refuse a model whose shape or config fingerprint differs from the one the vectors came from."""
        mine = self.meta.get("model", {})
        want = (mine.get("n_layers"), mine.get("d_model"), mine.get("fingerprint"))
        have = (model.n_layers, model.d_model, model.info.fingerprint)
        if want != have:
            raise ValueError(
                f"These directions were extracted from {mine.get('model_id')!r} (layers={want[0]}, "
                f"d_model={want[1]}, fingerprint={want[2]}) but the model is {model.info.model_id!r} "
                f"(layers={have[0]}, d_model={have[1]}, fingerprint={have[2]}). Extract directions for this "
                "model with `icon2-lens extract --model ...` or load the matching model."
            )

    # ---- disk -------------------------------------------------------------------------------
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``directions.safetensors`` + ``directions.json`` into folder ``path`` (atomically).

        Refuses an existing non-empty folder unless ``overwrite=True``.

        Examples:
            >>> dirs.save("out/directions")  # doctest: +SKIP
        """
        tensors = {"vectors": self.vectors.contiguous().float()}
        tensors.update({f"stats.{k}": v.contiguous().float() for k, v in self.stats.items()})
        with atomic_folder(path, overwrite=overwrite) as tmp:
            save_file(tensors, str(tmp / "directions.safetensors"), metadata={"format": _FORMAT})
            (tmp / "directions.json").write_text(self._meta_json())
        return Path(path)

    def _meta_json(self) -> str:
        return json.dumps({"format": _FORMAT, "criterion_names": self.criteria, **self.meta}, indent=2) + "\n"

    def update_meta_on_disk(self, path: str | Path) -> Path:
        """Rewrite only ``directions.json`` of the saved folder ``path`` (atomically).

        For metadata-only changes (e.g. `LayerReport.apply`); the saved tensors must be these.

        Examples:
            >>> report.apply(dirs).update_meta_on_disk("out/directions")  # doctest: +SKIP
        """
        on_disk = DirectionSet.load(path)
        if on_disk.criteria != self.criteria or not torch.equal(on_disk.vectors, self.vectors.float()):
            raise ValueError(f"{path} holds other vectors than this DirectionSet; use save(path, overwrite=True).")
        return atomic_write_text(Path(path) / "directions.json", self._meta_json())

    @classmethod
    def load(cls, path: str | Path, *, model: LoadedModel | None = None) -> DirectionSet:
        """Read a folder written by `save`; with ``model``, check it matches.

        Examples:
            >>> dirs = il.DirectionSet.load("out/directions", model=model)  # doctest: +SKIP
        """
        path = Path(path)
        jpath, tpath = path / "directions.json", path / "directions.safetensors"
        if not jpath.is_file() or not tpath.is_file():
            raise FileNotFoundError(
                f"{path} is not a DirectionSet folder (needs directions.json and directions.safetensors); "
                "create one with `icon2-lens extract --out FOLDER`."
            )
        todo = "Extract the directions again (`icon2-lens extract --out FOLDER`) or pass another DirectionSet folder."
        meta = read_json(jpath, what="a DirectionSet's metadata (JSON)", todo=todo)
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else f"a JSON {type(meta).__name__}"
            raise BadFileError(jpath, f"has format {found!r}; this version reads {_FORMAT!r}", todo)
        names = meta.pop("criterion_names", None)
        meta.pop("format")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise BadFileError(jpath, "has no list of criterion_names", todo)
        with reading(tpath, what="a DirectionSet's tensors (safetensors)", todo=todo):
            tensors = load_file(str(tpath))
        if "vectors" not in tensors:
            raise BadFileError(tpath, "holds no 'vectors' tensor", todo)
        stats = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("stats.")}
        problem = _tensor_problem(tensors["vectors"], names, stats)
        if problem is not None:  # here, so that the error names the file
            raise BadFileError(tpath, problem, todo)
        layers = meta.get("layers")
        if (not isinstance(layers, list) or not all(isinstance(x, int) for x in layers)
                or len(layers) != tensors["vectors"].shape[1] or not isinstance(meta.get("hook"), str)):
            raise BadFileError(jpath, "does not match its tensors (it needs 'layers', one model layer per row of "
                               "vectors, and 'hook')", todo)
        out = cls(vectors=tensors["vectors"], criteria=list(names), stats=stats, meta=meta)
        if model is not None:
            out.check_compatible(model)
        return out


# ---- steering vectors (used by icon2_lens.steering and export_gguf) ---------------------------------

#: What gamma is measured in (module docs): ``"relative"``: a fraction of each layer's mean residual norm;
#: ``"unit"``: gamma times the unit vector; ``"contrast"``: the criterion's P+/P- projection gap spread over the layers.
Scale = Literal["relative", "unit", "contrast"]
SCALES: tuple[str, ...] = ("relative", "unit", "contrast")
def steering_vectors(
    directions: DirectionSet,
    criterion: str | Sequence[str],
    gamma: float | Sequence[float] | Float[Tensor, " batch"],
    *,
    layers: Sequence[int] | range | None = None,
    scale: Scale = "relative",
) -> dict[int, Float[Tensor, "batch d_model"]]:
    """The vector added at each layer, one row per batch row (or one row for all).

    Defined here (re-exported by `icon2_lens.steering`, whose module docs explain the scales) so that
    `DirectionSet.export_gguf` can use it.

    ``criterion`` and ``gamma`` may each be one value or one per batch row. Row ``i`` at layer ``l``
    of the ``L`` layers is ``gamma_i * s * u[c_i, l]`` with ``s`` by ``scale`` (module docs):
    ``resid_norm[c_i, l]`` (``"relative"``: the mean residual norm at the read position, stored in
    the DirectionSet), ``1`` (``"unit"``) or ``|proj_gap[c_i, l]| / L`` (``"contrast"``: the mean
    projection of ``h+ - h-``; it is positive by the sign convention of the directions, its absolute
    value guards directions made elsewhere). The vectors add up over the layers; see
    `icon2_lens.math.gamma.cumulative_push`.

    Examples:
        >>> vecs = steering_vectors(dirs, "helpful", 0.1, layers=range(15, 25))  # doctest: +SKIP
        >>> vecs[15].shape  # doctest: +SKIP
        torch.Size([1, 576])
    """
    if scale not in SCALES:
        raise ValueError(f"Unknown scale {scale!r}; use 'relative', 'unit' or 'contrast'.")
    names = [criterion] if isinstance(criterion, str) else list(criterion)
    if not names:
        raise ValueError("No criterion given; pass a criterion name (or one per row).")
    idx = [directions.index(c) for c in names]
    g = torch.as_tensor(gamma, dtype=torch.float32).flatten()
    if not torch.isfinite(g).all():
        raise ValueError("gamma must be finite.")
    rows = max(len(idx), len(g))
    if len(idx) not in (1, rows) or len(g) not in (1, rows):
        raise ValueError(f"Got {len(idx)} criteria and {len(g)} gammas; give one of each or one per row.")
    idx_t = torch.tensor(idx).expand(rows) if len(idx) == 1 else torch.tensor(idx)
    g = g.expand(rows)
    if layers is None:
        layers = directions.suggested_layers
        if not layers:
            raise ValueError("These directions have no suggested layers; run `icon2-lens layers` first "
                             "or pass layers=.")
    layers = list(layers)
    if not layers:
        raise ValueError("The layer selection is empty; pass at least one layer (or None for the suggested range).")
    if len(set(layers)) != len(layers):
        raise ValueError(f"Layers repeat in {layers}; pass each layer once.")
    out = {}
    for layer in layers:
        if layer not in directions.layers:
            raise ValueError(f"Layer {layer} is not in the directions (which have {list(directions.layers)}); pass "
                             "layers from these (CLI: --layers), or extract the directions at that layer.")
        li = directions.layers.index(layer)
        u = directions.vectors[idx_t, li]  # [rows, d]
        if scale == "unit":
            size = g
        elif scale == "relative":
            size = g * directions.stats["resid_norm"][idx_t, li]
        else:
            size = g * directions.stats["proj_gap"][idx_t, li].abs() / len(layers)
        out[int(layer)] = size[:, None] * u
    return out



def _contrast_batches(
    model: LoadedModel, criterion: Criterion, instructions: Sequence[str], pairs_per_batch: int
) -> list[tuple[list[int], list[list[int]], list[list[int]]]]:
    """Batches of (instruction indices, positive ids, negative ids), sorted by length."""
    pos = tokenize_texts(model, stimulus_texts(model.tokenizer, criterion.positive, instructions))
    neg = tokenize_texts(model, stimulus_texts(model.tokenizer, criterion.negative, instructions))
    order = sorted(range(len(instructions)), key=lambda i: len(pos[i]) + len(neg[i]))
    out = []
    for s in range(0, len(order), pairs_per_batch):
        idx = order[s:s + pairs_per_batch]
        out.append((idx, [pos[i] for i in idx], [neg[i] for i in idx]))
    return out


def accumulate_contrasts(
    model: LoadedModel,
    criteria: Sequence[Criterion],
    instructions: Sequence[str],
    *,
    hook: HookKind | str = "resid_post",
    layers: Sequence[int] | range | None = None,
    batch_size: int = 32,
    groups: Sequence[int] | None = None,
    progress: bool = True,
    storage: Storage = "auto",
    reuse_prefix: bool = True,
) -> tuple[list[int], list[list[ContrastAccumulator]]]:
    """Read all contrast pairs and accumulate them per group and criterion.

    Args:
        groups: group id of each instruction (default: all in group 0); used for split-half stability.
        batch_size: prompts per forward pass (half positive, half negative).
        storage: how each accumulator keeps its pairs (see `icon2_lens.math.Storage`): ``"auto"``
            keeps the rows when a group has fewer instructions than ``d_model`` (memory twice that of
            the differences), else the ``d_model x d_model`` second moments; ``"gram"`` or ``"rows"``
            force one form (the directions agree to float32 rounding).
        reuse_prefix: compute each batch's shared system-prompt prefix once and reuse its KV cache for every
            instruction (`icon2_lens.gen.prefix.PrefixReader`: HF fast path; positive and negative prompts then
            run as two passes); ``False`` reads full prompts through the bridge's hook points. Both give the
            same residuals within float tolerance; ``resid_mid`` always uses the bridge.

    Returns:
        ``(layers, accumulators)`` with ``accumulators[group][criterion]``.

    Examples:
        >>> layers, accs = accumulate_contrasts(model, DEFAULT_CRITERIA, ["Hi"] * 4)  # doctest: +SKIP
    """
    require_chat_template(model.tokenizer)
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (one positive and one negative prompt), got {batch_size}.")
    group_of = list(groups) if groups is not None else [0] * len(instructions)
    if len(group_of) != len(instructions):
        raise ValueError("groups must give one group id per instruction.")
    n_groups = max(group_of) + 1
    reader = last_token_reader(model, hook=hook, layers=layers, reuse_prefix=reuse_prefix)
    # a 16-bit model's activations are kept at their own precision (lossless; the rows then take 1.5x the differences)
    dtype = next(model.bridge.parameters()).dtype
    rows_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
    accs = [[ContrastAccumulator(len(reader.layers), model.d_model, capacity=group_of.count(g), storage=storage,
                                 rows_dtype=rows_dtype)
             for _ in criteria] for g in range(n_groups)]
    plan = [(ci, b) for ci, c in enumerate(criteria)
            for b in _contrast_batches(model, c, instructions, max(1, batch_size // 2))]
    total = 2 * len(criteria) * len(instructions)
    with reader, tqdm(total=total, desc="extracting directions", unit="prompt", disable=not progress) as bar:
        for ci, (idx, pos_ids, neg_ids) in plan:
            if isinstance(reader, PrefixReader):  # one shared prefix per pass
                hp, hn = reader.read(pos_ids), reader.read(neg_ids)
            else:
                h = reader.read(pos_ids + neg_ids)
                hp, hn = h[: len(idx)], h[len(idx):]
            gids = torch.tensor([group_of[i] for i in idx])
            for g in range(n_groups):
                sel = (gids == g).nonzero().flatten()
                if len(sel):
                    accs[g][ci].update(hp[sel], hn[sel])
            bar.update(2 * len(idx))
    return reader.layers, accs


def extract_directions(
    model: LoadedModel,
    criteria: Sequence[Criterion | str] | Criterion | str | Path | None = None,
    instructions: Sequence[str] | str | Path | Any = "default",
    *,
    method: Method | str = ExtractConfig.method,
    hook: HookKind | str = ExtractConfig.hook,
    layers: Sequence[int] | range | None = None,
    batch_size: int = ExtractConfig.batch_size,
    stability: bool = ExtractConfig.stability,
    seed: int = 0,
    progress: bool = True,
    storage: Storage = "auto",
    reuse_prefix: bool = True,
) -> DirectionSet:
    """Extract one direction per criterion and layer from the model's own residual stream.

    Each instruction is rendered after the criterion's positive and negative system prompt (chat
    template, generation prompt), the last token's residual is read at every layer, and the
    differences give the direction (see `Method`).

    Args:
        model: from `icon2_lens.load_model`.
        criteria: criteria or names (default: `icon2_lens.DEFAULT_CRITERIA`), or a YAML file.
        instructions: the feature set: ``"default"`` (built-in, 256), a list, a TXT/JSONL file or a dataset.
        method: ``"pca"`` (default), ``"mean_diff"``, ``"pca_centered"``, or a name registered with
            `icon2_lens.math.register_direction_method`.
        hook: residual hook kind (default ``resid_post``).
        layers: layers to extract (default: all).
        batch_size: prompts per forward pass.
        stability: also measure split-half stability in the same pass: the instructions are split
            into two disjoint random halves (``seed``), a direction is computed from each half, and
            their cosine per layer is stored as ``stats["stability"]`` (the full-set directions are
            unchanged: the two halves' sums are merged). Costs two more eigendecompositions per
            layer and twice the accumulator memory, no extra forward passes.
        seed: seed of the split for ``stability``.
        progress: show a progress bar.
        storage: memory form of the contrast accumulators: ``"auto"`` (default) keeps the pairs'
            rows when there are fewer instructions than ``d_model`` (memory per criterion about twice
            that of the differences, ``2 x n x layers x d_model`` floats), else the
            ``2 x layers x d_model^2`` second moments; ``"rows"`` / ``"gram"`` force one (same
            directions to float32 rounding). Not part of `ExtractConfig`: it changes memory, not results.
        reuse_prefix: compute each criterion's system-prompt prefix once per batch and reuse its KV cache for
            every instruction (default; see `accumulate_contrasts`). Not part of `ExtractConfig` either: it
            changes speed, not results (residuals equal the full forward within float tolerance).

    Returns:
        A `DirectionSet` with unit vectors ``[criterion, layer, d_model]``.

    Examples:
        >>> import icon2_lens as il
        >>> model = il.load_model()  # doctest: +SKIP
        >>> dirs = il.extract_directions(model, il.DEFAULT_CRITERIA, "default")  # doctest: +SKIP
    """
    get_direction_method(method)  # an unknown name fails before the forward passes
    crits = resolve_criteria(criteria)
    instr = load_instructions(instructions)
    groups = split_halves(len(instr), seed=seed) if stability else None
    layer_list, accs = accumulate_contrasts(
        model, crits, instr, hook=hook, layers=layers, batch_size=batch_size, groups=groups, progress=progress,
        storage=storage, reuse_prefix=reuse_prefix,
    )
    if stability:
        # one criterion at a time, so at most one merged accumulator exists besides the halves
        per, stab = [], []
        for c in range(len(crits)):
            va, _ = accs[0][c].directions(method)
            vb, _ = accs[1][c].directions(method)
            stab.append(cosine_per_layer(va, vb))
            per.append(accs[0][c].merge(accs[1][c]).directions(method))
        vecs = torch.stack([p[0] for p in per])
        stats = {k: torch.stack([p[1][k] for p in per]) for k in STAT_NAMES}
        stats["stability"] = torch.stack(stab)
    else:
        vecs, stats = finish_directions(accs[0], method)
    meta = {
        "criteria": [c.to_dict() for c in crits],
        "layers": layer_list,
        "hook": hook.split(".")[-1].removeprefix("hook_"),
        "method": method,
        "n_instructions": len(instr),
        "instruction_hashes": sorted({instruction_hash(x) for x in instr}),
        "model": model.info.to_dict(),
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "suggested_layers": None,
    }
    if stability:
        meta["stability_split"] = {"seed": seed, "halves": [groups.count(0), groups.count(1)]}  # type: ignore[union-attr]
    return DirectionSet(vectors=vecs, criteria=[c.name for c in crits], stats=stats, meta=meta)
