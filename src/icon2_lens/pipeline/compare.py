"""Icon2 and the competing methods side by side: the same instructions, budget and trainer; cost and quality.

`compare_methods` takes a prepared Icon2 run (its ``score`` selection and ``generate`` pairs; `icon2_lens.compare`
makes one) and, for every method asked:

1. **pairs** on the same instructions (Icon2's selection: the baselines answer exactly the instructions Icon2
   kept, so quality differences come from the responses, not the prompts; SAO writes its own prompts from
   personas, one per instruction, so its pool is matched in size and criterion, not in text), with the same
   token budget and repetition penalty (`icon2_lens.baselines.ResponseBudget`); each method keeps its own
   decoding recipe (Icon2 and system prompts greedy, the sampling methods at their papers' temperatures);
2. **costs** per kept pair from the shared accounting, split into generation and labelling (Icon2's labelling is
   its extract, layers and score stages; the instruction pool's synthesis is shared by all and reported apart);
3. **one model per method** trained with the same `icon2_lens.TrainConfig` (SAO also with SimPO, beta 10,
   gamma 3, as its paper trains, beside the like-for-like DPO row), plus the swapped-pairs control of Icon2;
4. **quality** on the held-out, human-written preference set (`icon2_lens.preference`): margin shift against
   the base model with intervals, preference and implicit-reward accuracy, response lengths; every method
   against Icon2 pair by pair ("above", "below", "not distinguishable");
5. the **reward accuracy over training steps** of Icon2 pairs vs system-prompt pairs (paper App. I), judge
   statistics of every self-judging method, ``compare.json`` and ``report.md`` with figures.

Every step is resumable: pairs continue where they stopped, a model whose pairs and settings are unchanged is
not retrained, and a changed setting discards what depends on it (recorded in ``steps.json``).

Layout of ``out``: ``<method>/pairs.jsonl``, ``<method>/costs.json``, ``<method>/model/`` (an HF folder
`icon2_lens.load_model` opens), ``controls/swapped/model/``, ``compare.json``, ``report.md``, ``*.png``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..baselines import METHODS, make_pairs, method_config
from ..controls import swap_pairs
from ..errors import BadInputError, check_finite
from ..gen.base import check_count
from ..models import LoadedModel, load_model
from ..preference import (
    PairLogprobs,
    first_per_criterion,
    load_preference_set,
    model_contrasts,
    pair_logprobs,
    preference_metrics,
    preference_set_sha256,
)
from ..runs import names
from ..runs.costs import StageCost, load_costs
from ..runs.io import atomic_write_text, read_jsonl
from ..training import TrainConfig, train

__all__ = ["CompareConfig", "CompareResult", "compare_methods", "ALL_METHODS", "compare_markdown"]

#: Every method `compare` can run, Icon2 first.
MethodName = Literal["icon2", "system_prompts", "sampling_ranking", "self_rewarding", "self_refine", "sao"]
ALL_METHODS: tuple[MethodName, ...] = ("icon2", "system_prompts", "sampling_ranking", "self_rewarding",
                                       "self_refine", "sao")
#: Icon2's stages that label (decide what the pairs are about) rather than generate responses.
ICON2_LABELLING = ("extract", "layers", "score")
COMPARE_JSON = "compare.json"
COMPARE_REPORT = "report.md"
STEPS = "steps.json"


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    """Settings of a comparison: which methods, how many instructions, the shared budget, controls, evaluation.

    The defaults are the demo size (16 instructions, 128 tokens: every method, its model and the evaluation in
    about 20-30 minutes on a 2-core CPU); docs/compare.md's measured run used ``n=66, n_pool=132``.

    Attributes:
        methods: the methods to run (``icon2`` is always the reference row; listed or not, it runs).
        n: instructions per method (Icon2 keeps its ``n`` best of the pool; every baseline answers the same ``n``).
        n_pool: instructions the model writes for Icon2 to select from (``pool`` unset).
        pool: an instruction pool of your own instead (a built-in set name, a file or a folder).
        max_new_tokens: token budget per response, the same for every method.
        repetition_penalty: the same for every method.
        batch_size: instructions per generation batch, every method.
        controls: control models trained beside the methods (``swapped``: Icon2's pairs with chosen and rejected
            exchanged).
        sao_objectives: SAO's rows: ``dpo`` (like for like with the others) and/or ``simpo`` (SAO's own loss,
            beta 10, gamma 3, the shared learning rate and batch).
        sao_judge_format: SAO's judge: ``"forced"`` (default here: its verdict format read as log-probabilities;
            the embedded 135M model never writes a parseable ranking, so ``"free"`` keeps no pair) or ``"free"``
            (the paper's; see `icon2_lens.baselines.sao.SAOConfig`).
        n_preference: evaluate on the first ``n`` pairs of each criterion of the held-out set's test split
            (``None``: all).
        n_boot: bootstrap resamples of every interval.
        level: interval coverage.

    Examples:
        >>> CompareConfig(methods=["icon2", "system_prompts"], n=64, n_pool=128).max_new_tokens
        128
    """

    methods: list[MethodName] = field(default_factory=lambda: list(ALL_METHODS))
    n: int = 16
    n_pool: int = 48
    pool: str | None = None
    max_new_tokens: int = 128
    repetition_penalty: float = 1.1
    batch_size: int = 8
    controls: list[Literal["swapped"]] = field(default_factory=lambda: ["swapped"])
    sao_objectives: list[Literal["dpo", "simpo"]] = field(default_factory=lambda: ["dpo", "simpo"])
    sao_judge_format: Literal["free", "forced"] = "forced"
    n_preference: int | None = None
    n_boot: int = 2000
    level: float = 0.9

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in ALL_METHODS]
        if bad:
            raise BadInputError(f"Unknown method(s) {bad}; use some of {list(ALL_METHODS)}.", option="methods")
        for name in ("n", "n_pool", "max_new_tokens", "batch_size", "n_preference", "n_boot"):
            check_count(getattr(self, name), name)
        if self.pool is None and self.n_pool < self.n:
            raise BadInputError(f"n_pool ({self.n_pool}) must be at least n ({self.n}): Icon2 selects n of the pool.",
                                option="n_pool")
        if "sao" in self.methods and not self.sao_objectives:
            raise BadInputError("sao_objectives is empty; give dpo and/or simpo (SAO's own loss).",
                                option="sao_objectives")
        check_finite(self.repetition_penalty, "repetition_penalty", low=0.0, low_open=True)
        check_finite(self.level, "level")
        if not 0 < self.level < 1:
            raise BadInputError(f"level must be in (0, 1), got {self.level}.", option="level")

    @property
    def all_methods(self) -> list[str]:
        """Icon2 first, then the baselines asked, in `ALL_METHODS` order."""
        return [m for m in ALL_METHODS if m == "icon2" or m in self.methods]


@dataclass
class CompareResult:
    """What `compare_methods` wrote and found.

    Attributes:
        out: the comparison folder.
        report: ``report.md``.
        summary: the content of ``compare.json``.
        ran: the steps run this time (``pairs:sao``, ``train:icon2``, ...); the rest were reused.
    """

    out: Path
    report: Path
    summary: dict[str, Any]
    ran: list[str] = field(default_factory=list)


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class _Steps:
    """``steps.json``: the digest each finished step was made with (a changed digest re-runs the step)."""

    def __init__(self, out: Path) -> None:
        self.path = out / STEPS
        self.done: dict[str, str] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def current(self, key: str, digest: str) -> bool:
        return self.done.get(key) == digest

    def mark(self, key: str, digest: str) -> None:
        self.done[key] = digest
        atomic_write_text(self.path, json.dumps(self.done, indent=2, sort_keys=True))

    def forget(self, key: str) -> None:
        if self.done.pop(key, None) is not None:
            atomic_write_text(self.path, json.dumps(self.done, indent=2, sort_keys=True))


def _icon2_costs(icon2_run: Path) -> StageCost:
    """Icon2's costs in the baselines' shape: generation = ``generate``; labelling = extract + layers + score."""
    gen = load_costs(icon2_run / "generate")
    lab = [load_costs(icon2_run / s) for s in ICON2_LABELLING]
    keys = ("prompt_tokens", "generated_tokens", "forward_passes", "wall_seconds")
    # the generate stage also writes a pair report (evaluation, its own phase): only its generation phase counts
    phases = {"generation": {k: gen.phases["generation"][k] if "generation" in gen.phases else getattr(gen, k)
                             for k in keys},
              "labelling": {k: round(sum(getattr(c, k) for c in lab), 3)
                            for k in ("prompt_tokens", "generated_tokens", "forward_passes", "wall_seconds")}}
    total = {k: round(sum(p[k] for p in phases.values()), 3) for k in phases["generation"]}
    return StageCost(stage="icon2", prompt_tokens=int(total["prompt_tokens"]),
                     generated_tokens=int(total["generated_tokens"]), forward_passes=int(total["forward_passes"]),
                     wall_seconds=float(total["wall_seconds"]), peak_rss_mib=max(gen.peak_rss_mib, *(
                         c.peak_rss_mib for c in lab)), rows=gen.rows, device=gen.device, phases=phases)


def _kept(rows: Sequence[Mapping[str, Any]]) -> int:
    return sum(1 for r in rows if r.get("kept", True) is not False)


def judge_statistics(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Parse rate and first-position share of a self-judging method's rows (their ``judge`` dicts).

    Examples:
        >>> judge_statistics([{"judge": {"comparisons": 2, "parsed": 1, "first_position": 1}}])["parse_rate"]
        0.5
    """
    stats = [r["judge"] for r in rows if isinstance(r.get("judge"), Mapping)]
    if not stats:
        return None
    asked = sum(int(s["comparisons"]) for s in stats)
    parsed = sum(int(s["parsed"]) for s in stats)
    firsts = [s for s in stats if s.get("first_position") is not None]
    n_first = sum(int(s["first_position"]) for s in firsts)
    parsed_pairwise = sum(int(s["parsed"]) for s in firsts)
    return {"comparisons": asked, "parsed": parsed, "parse_rate": parsed / asked if asked else None,
            "first_position_share": n_first / parsed_pairwise if parsed_pairwise else None,
            "pairwise_verdicts": parsed_pairwise}


def _train_rows(method: str, cfg: CompareConfig) -> list[tuple[str, str]]:
    """(model name, objective) rows a method is trained into."""
    if method != "sao":
        return [(method, "dpo")]
    return [("sao" if o == "dpo" else "sao_simpo", o) for o in cfg.sao_objectives]


def _objective_config(base: TrainConfig, objective: str) -> TrainConfig:
    if objective == "dpo":
        return dataclasses.replace(base, objective="dpo", simpo_gamma=None,
                                   beta=base.beta if base.objective == "dpo" else None)
    return dataclasses.replace(base, objective="simpo", preset="demo" if base.preset == "sao" else base.preset,
                               beta=10.0, simpo_gamma=3.0)


def compare_methods(
    icon2_run: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str],
    config: CompareConfig | None = None,
    train_config: TrainConfig | None = None,
    model: str | os.PathLike[str] | None = None,
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> CompareResult:
    """Run the baselines beside a prepared Icon2 run, train one model per method, evaluate all, and report.

    Args:
        icon2_run: a run directory with Icon2's ``extract``, ``layers``, ``score`` and ``generate`` stages done
            (`icon2_lens.run_pipeline` with ``stop_after="generate"``; `icon2_lens.compare` makes it).
        out: the comparison folder (module docs for its layout); a rerun resumes.
        config: a `CompareConfig`.
        train_config: the trainer settings every method gets (default: ``TrainConfig(trim_unfinished=True)``, the
            demo's: cut responses trimmed to their last sentence).
        model: the base model (what `icon2_lens.load_model` takes; ``None``: the embedded one). It must be the
            model of ``icon2_run``.
        device: ``"cpu"``, ``"cuda"``, ... (default: CUDA if available).
        seed: seed of every method, every trainer and the bootstrap.
        progress: progress bars.
        log: where step lines go (``None``: silent).

    Returns:
        A `CompareResult`.

    Examples:
        >>> res = compare_methods("runs/icon2", out="runs/compare",  # doctest: +SKIP
        ...                       config=CompareConfig(methods=["icon2", "system_prompts"]))
        >>> res.summary["methods"]["system_prompts"]["costs"]["generated_tokens_per_pair"]  # doctest: +SKIP
    """
    cfg = config or CompareConfig()
    tcfg = dataclasses.replace(train_config or TrainConfig(trim_unfinished=True), seed=seed)
    run, root = Path(icon2_run), Path(out)
    say = log or (lambda _m: None)
    selected = run / "score" / names.SELECTED
    icon2_pairs = run / "generate" / names.PAIRS
    for need in (selected, icon2_pairs):
        if not need.is_file():
            raise FileNotFoundError(f"{need} does not exist; run Icon2's stages up to generate first "
                                    "(icon2_lens.run_pipeline(..., stop_after='generate') or icon2-lens compare).")
    root.mkdir(parents=True, exist_ok=True)
    steps, ran = _Steps(root), []
    table = read_jsonl(selected)
    base: LoadedModel | None = None

    def base_model() -> LoadedModel:
        nonlocal base
        if base is None:
            base = load_model(model, device=device)
        return base

    # ---- pairs and costs ----
    method_rows: dict[str, list[dict[str, Any]]] = {}
    costs: dict[str, StageCost] = {}
    for method in cfg.all_methods:
        folder = root / method
        if method == "icon2":
            folder.mkdir(exist_ok=True)
            shutil.copyfile(icon2_pairs, folder / names.PAIRS)
            _icon2_costs(run).save(folder / names.COSTS)
        else:
            settings: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens,
                                        "repetition_penalty": cfg.repetition_penalty, "batch_size": cfg.batch_size}
            if method == "sao":
                settings["judge_format"] = cfg.sao_judge_format
            mcfg = method_config(method, settings)
            key, digest = f"pairs:{method}", _sha([dataclasses.asdict(mcfg), table, seed, str(model)])
            if not steps.current(key, digest) or not (folder / names.COSTS).is_file():
                if not steps.current(key, digest) and folder.exists():
                    shutil.rmtree(folder)  # another setting made these: start over
                    steps.forget(key)
                say(f"[compare] {method}: making pairs for {len(table)} instructions")
                make_pairs(method, base_model(), table, mcfg, seed=seed, out=folder, progress=progress)
                steps.mark(key, digest)
                ran.append(key)
        method_rows[method] = read_jsonl(folder / names.PAIRS)
        costs[method] = load_costs(folder)
    pool_cost = load_costs(run / "synthesize") if (run / "synthesize" / names.COSTS).is_file() else None

    # ---- training ----
    trained: dict[str, Path] = {}
    logs: dict[str, list[dict[str, Any]]] = {}
    jobs: list[tuple[str, Path, Any, TrainConfig]] = []
    for method in cfg.all_methods:
        for name, objective in _train_rows(method, cfg):
            mdir = root / method / ("model" if name == method else f"model_{objective}")
            jobs.append((name, mdir, root / method / names.PAIRS, _objective_config(tcfg, objective)))
    for kind in cfg.controls:
        jobs.append((kind, root / "controls" / kind / "model", swap_pairs(root / "icon2" / names.PAIRS), tcfg))
    for name, mdir, pairs, tc in jobs:
        source = pairs if isinstance(pairs, Path) else None
        pairs_digest = _file_sha(source) if source is not None else _sha(pairs)
        key, digest = f"train:{name}", _sha([pairs_digest, dataclasses.asdict(tc), str(model)])
        if not steps.current(key, digest) or not (mdir / "config.json").is_file():
            say(f"[compare] {name}: training ({tc.objective})")
            mdir.parent.mkdir(parents=True, exist_ok=True)
            train(pairs, config=tc, model_source=model, output_dir=mdir, device=device, overwrite=True,
                  progress=progress, log=say)
            steps.mark(key, digest)
            ran.append(key)
        trained[name] = mdir
        log_path = mdir / names.TRAIN_LOG
        logs[name] = read_jsonl(log_path) if log_path.is_file() else []

    # ---- evaluation on the held-out preference set ----
    pref = first_per_criterion(load_preference_set(), cfg.n_preference)
    set_sha = preference_set_sha256(pref)
    lps: dict[str, PairLogprobs] = {}
    evaluated: list[tuple[str, Path | None]] = [("base", None), *trained.items()]
    for name, mpath in evaluated:
        cache = (root / "base_preference.json") if mpath is None else mpath.parent / f"preference_{mpath.name}.json"
        ident = _sha([set_sha, str(model), steps.done.get(f"train:{name}") if mpath is not None else "base"])
        if cache.is_file() and json.loads(cache.read_text()).get("id") == ident:
            lps[name] = _lp_from_json(json.loads(cache.read_text()))
            continue
        say(f"[compare] {name}: reading the {len(pref)} held-out preference pairs")
        m = base_model() if mpath is None else load_model(mpath, device=device)
        lps[name] = pair_logprobs(m, pref)
        atomic_write_text(cache, json.dumps({"id": ident, **_lp_to_json(lps[name])}))
        ran.append(f"evaluate:{name}")
    metrics = preference_metrics(lps, pref, reference="base", n_boot=cfg.n_boot, level=cfg.level, seed=seed)
    others = [n for n in lps if n not in ("base", "icon2")]
    contrasts = model_contrasts(lps, pref, subject="icon2", controls=others, n_boot=cfg.n_boot, level=cfg.level,
                                seed=seed) if others else {}

    summary = _summary(cfg, tcfg, method_rows, costs, pool_cost, metrics, contrasts, logs, trained, root, seed,
                       set_sha, len(pref))
    atomic_write_text(root / COMPARE_JSON, json.dumps(summary, indent=2))
    figures = _figures(summary, logs, root)
    report = atomic_write_text(root / COMPARE_REPORT, compare_markdown(summary, figures=figures))
    return CompareResult(out=root, report=report, summary=summary, ran=ran)


def _lp_to_json(lp: PairLogprobs) -> dict[str, list[float]]:
    return {k: [float(x) for x in getattr(lp, k)] for k in ("chosen", "rejected", "chosen_tokens", "rejected_tokens")}


def _lp_from_json(d: Mapping[str, Any]) -> PairLogprobs:
    import torch

    return PairLogprobs(**{k: torch.tensor(d[k], dtype=torch.float64)
                           for k in ("chosen", "rejected", "chosen_tokens", "rejected_tokens")})


def _per_pair(c: StageCost | Mapping[str, Any], kept: int) -> dict[str, float | None]:
    get = (lambda k: c.get(k, 0)) if isinstance(c, Mapping) else (lambda k: getattr(c, k))
    return {f"{k}_per_pair": (float(get(k)) / kept if kept else None)
            for k in ("prompt_tokens", "generated_tokens", "forward_passes", "wall_seconds")}


def _summary(cfg: CompareConfig, tcfg: TrainConfig, rows: Mapping[str, list[dict[str, Any]]],
             costs: Mapping[str, StageCost], pool_cost: StageCost | None, metrics: dict[str, Any],
             contrasts: dict[str, Any], logs: Mapping[str, list[dict[str, Any]]], trained: Mapping[str, Path],
             root: Path, seed: int, set_sha: str, n_pref: int) -> dict[str, Any]:
    methods: dict[str, Any] = {}
    for method, rs in rows.items():
        kept = _kept(rs)
        c = costs[method]
        measured = c.rows or 0  # the kept pairs made while the costs were counted (all of them, unless resumed)
        phases = {p: _per_pair(v, measured) for p, v in c.phases.items()}
        methods[method] = {
            "instructions": len(rs), "kept_pairs": kept,
            "drop_reasons": {r: sum(1 for x in rs if x.get("drop_reason") == r)
                             for r in sorted({str(x.get("drop_reason")) for x in rs if x.get("kept") is False})},
            "both_finished": sum(1 for r in rs if r.get("chosen_finished") and r.get("rejected_finished")),
            "costs": {**_per_pair(c, measured), "pairs_measured": measured, "total": c.to_dict(), "phases": phases},
            "judge": judge_statistics(rs),
            "self_judging": method in METHODS and METHODS[method].self_judging,
            "response_words": _words(rs),
        }
    icon2 = methods["icon2"]["costs"]
    for m in methods.values():
        mc = m["costs"]
        m["costs"]["ratio_to_icon2"] = {k: (mc[k] / icon2[k] if mc[k] is not None and icon2[k] else None)
                                        for k in ("prompt_tokens_per_pair", "generated_tokens_per_pair",
                                                  "forward_passes_per_pair", "wall_seconds_per_pair")}
    headline = {}
    for other in ("sampling_ranking", "sao", "self_rewarding"):
        if other in methods:
            a, b = icon2, methods[other]["costs"]
            tot_a = (a["prompt_tokens_per_pair"] or 0) + (a["generated_tokens_per_pair"] or 0)
            tot_b = (b["prompt_tokens_per_pair"] or 0) + (b["generated_tokens_per_pair"] or 0)
            headline[f"icon2_over_{other}"] = {
                "generated_tokens": _ratio(a["generated_tokens_per_pair"], b["generated_tokens_per_pair"]),
                "all_tokens": _ratio(tot_a, tot_b),
                "wall_seconds": _ratio(a["wall_seconds_per_pair"], b["wall_seconds_per_pair"]),
                "generation_wall_seconds": _ratio(a["phases"].get("generation", {}).get("wall_seconds_per_pair"),
                                                  b["phases"].get("generation", {}).get("wall_seconds_per_pair"))}
    models: dict[str, Any] = {}
    for name, path in trained.items():
        cells = metrics["models"][name]
        tc_path = path / names.TRAIN_CONFIG
        tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
        models[name] = {"path": str(path.relative_to(root)), "quality": cells,
                        "vs_icon2": contrasts.get(name), "objective": tc.get("objective"),
                        "trained_pairs": tc.get("n_pairs"), "steps": tc.get("steps"),
                        "final_reward_accuracy": next((h["reward_accuracy"] for h in reversed(logs.get(name, []))
                                                       if h.get("reward_accuracy") is not None), None)}
    return {"config": dataclasses.asdict(cfg), "train_config": dataclasses.asdict(tcfg), "seed": seed,
            "cost_ratios": headline,
            "pool_cost": pool_cost.to_dict() if pool_cost is not None else None, "methods": methods,
            "models": models, "base": metrics["models"]["base"],
            "preference_set": {"n": n_pref, "sha256": set_sha, "split": "test"},
            "level": cfg.level, "n_boot": cfg.n_boot}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _words(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for side in ("chosen", "rejected"):
        lens = [len(str(r[side][-1]["content"]).split()) for r in rows
                if r.get("kept", True) is not False and isinstance(r.get(side), list) and r[side]]
        out[side] = sum(lens) / len(lens) if lens else None
    return out


def _figures(summary: Mapping[str, Any], logs: Mapping[str, list[dict[str, Any]]], root: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    curves = {k: v for k, v in logs.items() if k in ("icon2", "system_prompts") and v}
    if curves:
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        for name, hist in curves.items():
            pts = [(h["step"], h["reward_accuracy"]) for h in hist
                   if h.get("reward_accuracy") is not None and h.get("step") is not None]
            if pts:
                xs, ys = [x for x, _ in pts], [y for _, y in pts]
                line = ax.plot(xs, ys, ".", alpha=0.35)[0]
                w = 5  # a training batch holds a few pairs: its accuracy is coarse; the line is a running mean
                smooth = [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
                ax.plot(xs, smooth, color=line.get_color(), label=f"{name} (running mean of {w})")
        ax.set_xlabel("training step")
        ax.set_ylabel("DPO reward accuracy (training batch)")
        ax.set_ylim(-0.05, 1.05)
        ax.legend()
        ax.set_title("App. I: reward accuracy, Icon2 vs system-prompt pairs")
        fig.tight_layout()
        fig.savefig(root / "reward_accuracy.png", dpi=120)
        plt.close(fig)
        out["reward_accuracy"] = "reward_accuracy.png"
    models = summary["models"]
    names_ = [n for n in models if models[n]["quality"]["all"].get("margin_shift_mean") is not None]
    if names_:
        fig, ax = plt.subplots(figsize=(6, 0.45 * len(names_) + 1.2))
        for i, n in enumerate(names_):
            cell = models[n]["quality"]["all"]
            lo, hi, mu = cell["margin_shift_ci_low"], cell["margin_shift_ci_high"], cell["margin_shift_mean"]
            ax.errorbar([mu], [i], xerr=[[mu - lo], [hi - mu]], fmt="o", capsize=3)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(range(len(names_)), names_)
        ax.set_xlabel(f"margin shift vs base (nats/token), {int(summary['level'] * 100)}% interval")
        fig.tight_layout()
        fig.savefig(root / "quality.png", dpi=120)
        plt.close(fig)
        out["quality"] = "quality.png"
    return out


def _fmt(x: Any, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def compare_markdown(summary: Mapping[str, Any], *, figures: Mapping[str, str] | None = None) -> str:
    """``report.md`` of a comparison: cost, quality, judges, App. I curves (from ``compare.json``'s content)."""
    figures = figures or {}
    ms, models = summary["methods"], summary["models"]
    pct = int(summary["level"] * 100)
    lines = ["# Icon2 and the competing methods", "",
             f"Same instructions ({ms['icon2']['instructions']} selected by Icon2), same token budget "
             f"({summary['config']['max_new_tokens']}), same trainer ({summary['train_config']['objective']}, preset "
             f"{summary['train_config']['preset']}), seed {summary['seed']}. Quality is read on "
             f"{summary['preference_set']['n']} held-out human-written preference pairs "
             "(`icon2_lens.preference`), not through any method's own signal.", "",
             "## Cost per kept pair", "",
             "| method | kept pairs | generated tokens | prompt tokens | forward passes | wall s | generation: gen. tok"
             " / wall s | labelling: prompt tok / gen. tok / wall s | gen. tokens vs Icon2 | wall vs Icon2 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in ms.items():
        c = m["costs"]
        gen, lab = c["phases"].get("generation", {}), c["phases"].get("labelling", {})
        lines.append(f"| {name} | {m['kept_pairs']}/{m['instructions']} | {_fmt(c['generated_tokens_per_pair'], '.0f')}"
                     f" | {_fmt(c['prompt_tokens_per_pair'], '.0f')} | {_fmt(c['forward_passes_per_pair'], '.1f')} | "
                     f"{_fmt(c['wall_seconds_per_pair'], '.2f')} | {_fmt(gen.get('generated_tokens_per_pair'), '.0f')}"
                     f" / {_fmt(gen.get('wall_seconds_per_pair'), '.2f')} | "
                     f"{_fmt(lab.get('prompt_tokens_per_pair'), '.0f')} / "
                     f"{_fmt(lab.get('generated_tokens_per_pair'), '.0f')} / "
                     f"{_fmt(lab.get('wall_seconds_per_pair'), '.2f')}"
                     f" | {_fmt(c['ratio_to_icon2']['generated_tokens_per_pair'], '.2f')}x | "
                     f"{_fmt(c['ratio_to_icon2']['wall_seconds_per_pair'], '.2f')}x |")
    for key, r in summary.get("cost_ratios", {}).items():
        other = key.removeprefix("icon2_over_")
        lines.append(f"\nIcon2 / {other} per kept pair: generated tokens {_fmt(r['generated_tokens'], '.2f')}x, "
                     f"all tokens (prompt + generated) {_fmt(r['all_tokens'], '.2f')}x, wall time "
                     f"{_fmt(r['wall_seconds'], '.2f')}x (generation alone "
                     f"{_fmt(r['generation_wall_seconds'], '.2f')}x)"
                     + (" (the Icon2 paper: about 0.55x of Sampling-Ranking's total cost)."
                        if other == "sampling_ranking" else "."))
    lines += ["", "Icon2's labelling is its extract, layers and score stages (run once for the whole pool); the "
              "instruction pool's synthesis is shared by every method and not counted"
              + (f" ({summary['pool_cost']['generated_tokens']} generated tokens, "
                 f"{summary['pool_cost']['wall_seconds']:.0f} s)." if summary.get("pool_cost") else "."), "",
              f"## Quality on held-out preference pairs ({pct}% intervals)", "",
              "| model | trained pairs | margin shift vs base | preference accuracy | implicit reward accuracy "
              "| Icon2 minus this model (paired) | chosen / rejected words in its data |",
              "|---|---|---|---|---|---|---|"]
    base = summary["base"]["all"]
    lines.append(f"| base | - | 0 | {base['preference_accuracy']:.3f} | - | - | - |")
    for name, m in models.items():
        q = m["quality"]["all"]
        vs = m["vs_icon2"]["all"]["direction"] if m.get("vs_icon2") else "-"
        if m.get("vs_icon2"):
            d = m["vs_icon2"]["all"]
            vs = f"{d['direction']} ({d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}])"
        words = ms.get(name.removesuffix("_simpo"), {}).get("response_words", {}) if name in ms or name.endswith(
            "_simpo") else {}
        lines.append(f"| {name} | {_fmt(m['trained_pairs'])} | {q['margin_shift_mean']:+.4f} "
                     f"[{q['margin_shift_ci_low']:+.4f}, {q['margin_shift_ci_high']:+.4f}] | "
                     f"{q['preference_accuracy']:.3f} | {_fmt(q['implicit_reward_accuracy'], '.3f')} | {vs} | "
                     f"{_fmt(words.get('chosen'), '.0f')} / {_fmt(words.get('rejected'), '.0f')} |")
    lines += ["", "\"above\": Icon2's model has the higher margin. A method whose paired interval against Icon2 "
              "includes zero is *not distinguishable* from Icon2 at "
              "this size; the swapped control (Icon2's pairs with chosen and rejected exchanged, trained alike) "
              "shows how far the same training moves the margin the wrong way.", ""]
    if "quality" in figures:
        lines += [f"![quality]({figures['quality']})", ""]
    judged = {n: m["judge"] for n, m in ms.items() if m.get("judge") and m.get("self_judging")}
    if judged:
        lines += ["## Self-judging methods", "", "| method | judge queries | parse rate | first-position share |",
                  "|---|---|---|---|"]
        for n, j in judged.items():
            lines.append(f"| {n} | {j['comparisons']} | {_fmt(j['parse_rate'], '.3f')} | "
                         f"{_fmt(j['first_position_share'], '.3f')} |")
        lines += ["", "A first-position share far from 0.5 means the judge reads the position more than the answers.",
                  ""]
    curves = {n: models[n] for n in ("icon2", "system_prompts") if n in models}
    if curves:
        lines += ["## Reward accuracy over training (paper App. I)", ""]
        lines += [f"- {n}: {m['steps']} steps, final training-batch reward accuracy "
                  f"{_fmt(m['final_reward_accuracy'], '.2f')}" for n, m in curves.items()]
        if "reward_accuracy" in figures:
            lines += ["", f"![reward accuracy]({figures['reward_accuracy']})"]
        lines.append("")
    return "\n".join(lines) + "\n"
