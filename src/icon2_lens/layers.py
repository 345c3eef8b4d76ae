"""Layer analysis: where does a criterion live, and which layers should be steered?

Three separations per criterion and layer, each the share of pairs whose projection on the
layer's direction orders the positive above the negative member (0.5 = chance):

* **(a) held-out stimuli**: the extraction prompts on instructions not used for extraction. On a
  small model this is ~1.0 everywhere: the system prompts differ in their tokens, so it tells
  little.
* **(b) paraphrased system prompts**: prompts written for this project that express the same
  contrast in other words. Shows whether the direction is the concept or the extraction wording.
* **(c) contrasting responses**: the same question answered well and badly (helpful vs unhelpful,
  true vs false, safe vs unsafe), read with no system prompt at the response's last token.

The suggested steering range is the contiguous window (a third of the layers by default) with the
highest mean of (b) and (c) over criteria. The numbers (`separation`, `suggest_layer_range`) are
computed in `icon2_lens.math.layerstats`; this module reads the model and reports.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from jaxtyping import Float
from torch import Tensor

if TYPE_CHECKING:
    import matplotlib.figure

from .activations import read_last_token
from .criteria import Criterion
from .directions import DirectionSet, accumulate_contrasts, instruction_hash
from .gen.base import check_count
from .instructions import builtin_instructions, load_instructions
from .math.contrast import Method, cosine_per_layer, finish_directions, split_halves
from .math.layerstats import separation, steering_score, suggest_layer_range
from .math.probe import project_criterion
from .models import LoadedModel
from .prompts import render_chat, require_chat_template
from .reports import layer_figure, layer_table
from .runs.io import atomic_write_text

__all__ = [
    "LayersConfig",
    "LayerReport",
    "layer_report",
    "separation",
    "suggest_layer_range",
    "split_half_stability",
    "builtin_paraphrases",
    "builtin_response_pairs",
]


@dataclass(frozen=True, kw_only=True)
class LayersConfig:
    """Settings of `layer_report`: the one source of their defaults (library, CLI and pipeline).

    Attributes:
        n_heldout: held-out instructions for separations (a) and (b).
        n_paraphrase_instructions: instructions per paraphrase pair for (b).
        width: size of the suggested layer window (``None``: a third of the layers).
        batch_size: prompts per forward pass.
    """

    n_heldout: int = 64
    n_paraphrase_instructions: int = 16
    width: int | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        for name in ("n_heldout", "n_paraphrase_instructions", "width", "batch_size"):
            check_count(getattr(self, name), name)


#: (question, positive answer, negative answer)
ResponsePair = tuple[str, str, str]


def builtin_paraphrases() -> dict[str, list[tuple[str, str]]]:
    """Paraphrased (positive, negative) system prompts per default criterion, written for this project.

    Examples:
        >>> len(builtin_paraphrases()["helpful"]) >= 4
        True
    """
    text = resources.files("icon2_lens").joinpath("data").joinpath("paraphrases.yaml").read_text("utf-8")
    data = yaml.safe_load(text)
    return {k: [(p["positive"], p["negative"]) for p in v] for k, v in data.items()}


def builtin_response_pairs() -> dict[str, list[ResponsePair]]:
    """Contrasting (question, good answer, bad answer) triples per default criterion.

    Examples:
        >>> q, good, bad = builtin_response_pairs()["honest"][0]
    """
    out: dict[str, list[ResponsePair]] = {}
    text = resources.files("icon2_lens").joinpath("data").joinpath("response_pairs.jsonl").read_text("utf-8")
    for line in text.splitlines():
        if line.strip():
            row = json.loads(line)
            out.setdefault(row["criterion"], []).append((row["question"], row["positive"], row["negative"]))
    return out


@dataclass(frozen=True)
class LayerReport:
    """Per-criterion, per-layer separations and the suggested steering range.

    Attributes:
        criteria: criterion names (rows).
        layers: model layers (columns).
        heldout: (a) ``[criterion, layer]``.
        paraphrase: (b) ``[criterion, layer]`` (NaN for criteria without paraphrases).
        response: (c) ``[criterion, layer]`` (NaN for criteria without response pairs).
        suggested_layers: the suggested steering range.
        counts: number of pairs behind each separation, per criterion.
        stability: optional split-half cosine ``[criterion, layer]``.

    Examples:
        >>> report = il.layer_report(model, dirs)  # doctest: +SKIP
        >>> print(report.table())  # doctest: +SKIP
    """

    criteria: list[str]
    layers: list[int]
    heldout: Float[Tensor, "criterion layer"]
    paraphrase: Float[Tensor, "criterion layer"]
    response: Float[Tensor, "criterion layer"]
    suggested_layers: list[int]
    counts: dict[str, dict[str, int]]
    stability: Float[Tensor, "criterion layer"] | None = field(default=None)

    def _data(self) -> dict[str, Any]:
        return {"heldout": self.heldout, "paraphrase": self.paraphrase, "response": self.response,
                "stability": self.stability}

    def table(self) -> str:
        """A Markdown table: one row per layer, one column per criterion and measure."""
        return layer_table(self.criteria, self.layers, self.suggested_layers, **self._data())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of everything in the report."""
        d: dict[str, Any] = {
            "criteria": self.criteria,
            "layers": self.layers,
            "suggested_layers": self.suggested_layers,
            "counts": self.counts,
            "heldout": self.heldout.tolist(),
            "paraphrase": _nan_to_none(self.paraphrase),
            "response": _nan_to_none(self.response),
        }
        if self.stability is not None:
            d["stability"] = self.stability.tolist()
        return d

    def figure(self) -> matplotlib.figure.Figure:
        """A matplotlib Figure: one panel per measure, one line per criterion, suggested range shaded.

        Built without pyplot, so it neither changes the caller's backend nor registers a global
        figure; in a notebook, display it with ``display(report.figure())`` or plain ``report.figure()``.

        Examples:
            >>> fig = report.figure()  # doctest: +SKIP
        """
        return layer_figure(self.criteria, self.layers, self.suggested_layers, **self._data())

    def plot(self, path: str | Path) -> Path:
        """Write :meth:`figure` as a PNG (temp file, then rename) and return the path.

        Examples:
            >>> report.plot("runs/directions/layer_report.png")  # doctest: +SKIP
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.png")
        try:
            self.figure().savefig(tmp, dpi=110)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def save(self, folder: str | Path) -> dict[str, Path]:
        """Write ``layer_report.json``, ``layer_report.md`` and ``layer_report.png`` into ``folder``."""
        folder = Path(folder)
        out = {
            "json": atomic_write_text(folder / "layer_report.json", json.dumps(self.to_dict(), indent=2) + "\n"),
            "md": atomic_write_text(folder / "layer_report.md", "# Layer report\n\n" + self.table() + "\n"),
            "png": self.plot(folder / "layer_report.png"),
        }
        return out

    def apply(self, directions: DirectionSet) -> DirectionSet:
        """A copy of ``directions`` with the suggested range recorded in its metadata."""
        return directions.with_meta(suggested_layers=self.suggested_layers, layer_report=self.to_dict())


def _nan_to_none(t: Tensor) -> list[list[float | None]]:
    return [[None if v != v else v for v in row] for row in t.tolist()]


def _default_heldout(directions: DirectionSet, n: int) -> list[str]:
    used = set(directions.meta.get("instruction_hashes", []))
    # built-in "heldout" comes after "default" in "all": with the default feature set, these are the held-out 64
    pool = [x for x in builtin_instructions("all") if instruction_hash(x) not in used]
    if not pool:
        raise ValueError(
            "Every built-in feature instruction was used for extraction, so none is held out; "
            "pass heldout=[...] (CLI: --heldout FILE) with instructions not used for extraction."
        )
    return pool[:n]


def layer_report(
    model: LoadedModel,
    directions: DirectionSet,
    *,
    heldout: Sequence[str] | str | Path | None = None,
    n_heldout: int = LayersConfig.n_heldout,
    paraphrases: Mapping[str, Sequence[tuple[str, str]]] | None = None,
    n_paraphrase_instructions: int = LayersConfig.n_paraphrase_instructions,
    response_pairs: Mapping[str, Sequence[ResponsePair]] | None = None,
    width: int | None = LayersConfig.width,
    batch_size: int = LayersConfig.batch_size,
    stability: Float[Tensor, "criterion layer"] | None = None,
    progress: bool = True,
) -> LayerReport:
    """Measure separations (a), (b), (c) per criterion and layer and suggest a steering range.

    Args:
        model: the model the directions were extracted from (checked).
        directions: a `icon2_lens.DirectionSet`.
        heldout: instructions not used for extraction (default: built-in feature instructions whose
            hash is not recorded in the directions, first ``n_heldout``).
        paraphrases: ``{criterion: [(positive, negative), ...]}`` (default: the built-in set).
        n_paraphrase_instructions: held-out instructions read under each paraphrase pair.
        response_pairs: ``{criterion: [(question, good, bad), ...]}`` (default: the built-in set).
        width: size of the suggested window (default: a third of the layers).
        stability: optional split-half cosines from `split_half_stability`, kept in the report;
            default: ``directions.stats["stability"]`` when the directions were extracted with
            ``stability=True``.

    Examples:
        >>> report = il.layer_report(model, dirs)  # doctest: +SKIP
        >>> dirs = report.apply(dirs)  # records report.suggested_layers  # doctest: +SKIP
    """
    LayersConfig(n_heldout=n_heldout, n_paraphrase_instructions=n_paraphrase_instructions, width=width,
                 batch_size=batch_size)  # its checks, before any work
    directions.check_compatible(model)
    require_chat_template(model.tokenizer)
    held = load_instructions(heldout) if heldout is not None else _default_heldout(directions, n_heldout)
    para = builtin_paraphrases() if paraphrases is None else dict(paraphrases)
    resp = builtin_response_pairs() if response_pairs is None else dict(response_pairs)
    crits: list[Criterion] = directions.criterion_defs
    tok = model.tokenizer

    # Every text of (a), (b), (c) goes into one batched read; `spans` remembers where each sits.
    texts: list[str] = []
    spans: dict[tuple[str, str], tuple[int, int, int]] = {}  # (measure, criterion) -> (pos_start, neg_start, n)

    def add(key: tuple[str, str], pos: list[str], neg: list[str]) -> None:
        spans[key] = (len(texts), len(texts) + len(pos), len(pos))
        texts.extend(pos)
        texts.extend(neg)

    para_instr = held[:n_paraphrase_instructions]
    for c in crits:
        add(("a", c.name), [render_chat(tok, d, system=c.positive) for d in held],
            [render_chat(tok, d, system=c.negative) for d in held])
        if para.get(c.name):
            add(("b", c.name),
                [render_chat(tok, d, system=p) for p, _ in para[c.name] for d in para_instr],
                [render_chat(tok, d, system=n) for _, n in para[c.name] for d in para_instr])
        if resp.get(c.name):
            add(("c", c.name), [render_chat(tok, q, assistant=g) for q, g, _ in resp[c.name]],
                [render_chat(tok, q, assistant=b) for q, _, b in resp[c.name]])

    h = read_last_token(model, texts, hook=directions.hook, layers=directions.layers,
                        batch_size=batch_size, progress=progress, desc="layer report")
    n_c, n_l = len(crits), len(directions.layers)
    result = {m: torch.full((n_c, n_l), float("nan")) for m in "abc"}
    counts: dict[str, dict[str, int]] = {}
    for (m, name), (ps, ns, n) in spans.items():
        ci = directions.index(name)
        u = directions.vectors[ci]
        result[m][ci] = separation(project_criterion(h[ps:ps + n], u), project_criterion(h[ns:ns + n], u))
        counts.setdefault(name, {})[m] = n
    score = steering_score(result["a"], result["b"], result["c"])
    suggested = suggest_layer_range(score, width=width, layers=directions.layers)
    return LayerReport(
        criteria=list(directions.criteria), layers=directions.layers, heldout=result["a"],
        paraphrase=result["b"], response=result["c"], suggested_layers=suggested, counts=counts,
        stability=stability if stability is not None else directions.stats.get("stability"),
    )


def split_half_stability(
    model: LoadedModel,
    criteria: Sequence[Criterion | str] | DirectionSet | None,
    instructions: Sequence[str] | str | Path | Any = "default",
    *,
    method: Method = "pca",
    hook: str = "resid_post",
    layers: Sequence[int] | range | None = None,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> Float[Tensor, "criterion layer"]:
    """Cosine between directions extracted from two disjoint random halves of the instructions.

    One pass over the model: each instruction's contrast pair goes to the accumulator of its half.

    Examples:
        >>> stab = il.layers.split_half_stability(model, dirs, "default")  # doctest: +SKIP
        >>> stab.shape  # doctest: +SKIP
        torch.Size([4, 30])
    """
    if isinstance(criteria, DirectionSet):
        crit_list: Sequence[Criterion | str] = criteria.criterion_defs
        method = criteria.meta["method"]
        hook = criteria.hook
        layers = criteria.layers
    else:
        crit_list = criteria if criteria is not None else []
    from .criteria import resolve_criteria

    crits = resolve_criteria(crit_list or None)
    instr = load_instructions(instructions)
    groups = split_halves(len(instr), seed=seed)
    _, accs = accumulate_contrasts(model, crits, instr, hook=hook, layers=layers, batch_size=batch_size,
                                   groups=groups, progress=progress)
    va, _ = finish_directions(accs[0], method)
    vb, _ = finish_directions(accs[1], method)
    return torch.stack([cosine_per_layer(va[c], vb[c]) for c in range(len(crits))])
