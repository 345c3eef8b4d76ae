"""Every Markdown table and figure the stages write, built from plain data.

Each builder takes what the stage saves (the metrics dict of ``metrics.json``, the dict of
``calibration.json``, tensors or nested lists, plain rows), so a report can be drawn again from a
run folder without the stage's objects. Figures are `matplotlib.figure.Figure` objects built
without pyplot (no global state, the caller's backend untouched); in a notebook, display one with
``display(fig)``.

This module sits below the stage modules: it imports only torch and matplotlib (lazily), never a
stage. The stages' methods and names delegate here: `icon2_lens.LayerReport.table` /
``figure``, `icon2_lens.CalibrationResult.table` / ``figure``, `icon2_lens.scoring.consistency_histogram`,
`icon2_lens.runs.cost_table` and the report that `icon2_lens.evaluate` writes.

Examples:
    >>> from icon2_lens import reports
    >>> print(reports.cost_table([{"stage": "score", "prompt_tokens": 1200, "generated_tokens": 0,
    ...                            "forward_passes": 3, "wall_seconds": 2.0, "peak_rss_mib": 512.0, "rows": 40}]))
    | stage | prompt tokens | generated tokens | forward passes | wall s | peak RSS MiB | rows |
    |---|---|---|---|---|---|---|
    | score | 1,200 | 0 | 3 | 2.0 | 512 | 40 |
    | **total** | 1,200 | 0 | 3 | 2.0 | 512 | |
    <BLANKLINE>
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    import matplotlib.figure

__all__ = [
    "evaluation_markdown",
    "preference_markdown",
    "preference_figure",
    "probe_shift_figure",
    "calibration_table",
    "calibration_figure",
    "layer_table",
    "layer_figure",
    "consistency_figure",
    "cost_table",
]

#: A ``[criterion, layer]`` table: a tensor, or nested lists with ``None`` for missing values.
Grid = Tensor | Sequence[Sequence[float | None]]


# ---- evaluation ------------------------------------------------------------------------------------------


def _num(x: Any, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def preference_markdown(p: Mapping[str, Any]) -> list[str]:
    """Markdown lines of the judge-free preference figures (`icon2_lens.preference.evaluate_preferences`)."""
    pct = round(100 * p["level"])
    s = p.get("set", {})
    lines = [f"## Judge-free preference margins (held-out human-written pairs, n = {s.get('n', '?')}, "
             f"set sha256 {str(s.get('sha256', ''))[:12]})", "",
             "Length-normalised log-likelihood margin of the better over the worse answer (nats/token); "
             f"accuracy = share of pairs with a positive margin; shift = the model's margin minus the base "
             f"model's, paired, {pct}% bootstrap interval; implicit reward = DPO's log-ratio against the base "
             "model (share of pairs it ranks right). Lengths in tokens (chosen / rejected). None of these read "
             "the steering directions.", "",
             "| model | criterion | n | accuracy | margin [CI] | shift vs base [CI] | implicit reward acc. | "
             "length c / r |", "|---|---|---|---|---|---|---|---|"]
    for name, cells in p["models"].items():
        for crit, c in cells.items():
            shift = ("-" if c.get("margin_shift_mean") is None else
                     f"{c['margin_shift_mean']:+.4f} "
                     f"[{c['margin_shift_ci_low']:+.4f}, {c['margin_shift_ci_high']:+.4f}]")
            lines.append(f"| {name} | {crit} | {c['n']} | {c['preference_accuracy']:.3f} | {c['margin_mean']:+.4f} "
                         f"[{c['margin_ci_low']:+.4f}, {c['margin_ci_high']:+.4f}] | {shift} | "
                         f"{_num(c['implicit_reward_accuracy'])} | {c['chosen_tokens_mean']:.0f} / "
                         f"{c['rejected_tokens_mean']:.0f} |")
    con = p.get("contrasts")
    if con and con.get("controls"):
        lines += ["", f"### {con['subject']} against its controls (margin difference, paired, {pct}% interval)", "",
                  "| control | criterion | n | difference [CI] | distinguishable |", "|---|---|---|---|---|"]
        for ctrl, cells in con["controls"].items():
            for crit, d in cells.items():
                verdict = {"above": f"yes: {con['subject']} above the control",
                           "below": f"yes: {con['subject']} **below** the control (reversed)",
                           "too few pairs": "no: too few pairs for an interval"}.get(
                    d.get("direction", ""), "no: not distinguishable at this size")
                if "direction" not in d and d["distinguishable"]:
                    verdict = "yes"
                lines.append(f"| {ctrl} | {crit} | {d['n']} | {d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] | "
                             f"{verdict} |")
    return lines


def evaluation_markdown(m: Mapping[str, Any]) -> str:
    """The evaluation report (``report.md``) from `icon2_lens.evaluate`'s metrics (``metrics.json``).

    The judge-free preference margins first (the independent figures), then, when answers were generated,
    the pairwise judge (with its position bias), degeneration, and last the self-probe shift, labelled.
    """
    models = m["models"]
    lines = [f"# Evaluation: {models['trained']} vs {models['base']}"
             + (f" (controls: {', '.join(k for k in models if k not in ('base', 'trained'))})"
                if len(models) > 2 else ""), ""]
    lines += preference_markdown(m["preference"])
    if "judge" in m:
        j = m["judge"]
        lines += ["", f"## Pairwise judge ({j['name']}, {m['n_instructions']} held-out instructions, both orders; "
                  "a flip is a tie)", "", "| win | tie | loss |", "|---|---|---|",
                  f"| {j['win']:.2f} | {j['tie']:.2f} | {j['loss']:.2f} |", ""]
        if j.get("first_position_share") is not None:
            lines += [f"The judge picked the response shown first in {j['first_position_share']:.2f} of its "
                      f"{2 * j['n']} verdicts (0.5: no position bias)."
                      + (f" **{j['note']}**: its verdicts are not evidence either way."
                         if j.get("able_to_judge") is False else f" {j['note']}." if j.get("note") else ""), ""]
        elif j.get("note"):
            lines += [j["note"], ""]
    if "degeneration" in m:
        lines += ["## Degeneration", "", "| model | distinct-1 | distinct-2 | repetition | degenerate | mean words |",
                  "|---|---|---|---|---|---|"]
        for name, d in m["degeneration"].items():
            lines.append(f"| {name} | {d['distinct1']:.2f} | {d['distinct2']:.2f} | {d['repetition_rate']:.2f} | "
                         f"{d['degenerate_share']:.2f} | {d['mean_words']:.0f} |")
    if "self_probe" in m:
        pct = round(100 * m["preference"]["level"])
        lines += ["", "## Self-probe shift (the base model's criterion directions, others projected out)", "",
                  "*Self-probe*: read through the same criterion directions that made the training data, so it is a "
                  "manipulation check, not evidence of quality (see the project's evidence rules).", "",
                  f"| criterion | base | trained | shift [{pct}% CI] |", "|---|---|---|---|"]
        lines += [f"| {c} | {v['base']:.3f} | {v['trained']:.3f} | {v['shift']:+.3f} [{v['shift_ci_low']:+.3f}, "
                  f"{v['shift_ci_high']:+.3f}] |" for c, v in m["self_probe"].items()]
    return "\n".join(lines) + "\n"


def preference_figure(m: Mapping[str, Any]) -> matplotlib.figure.Figure:
    """Margin shift against the base model per criterion and model, with intervals (``preference.png``)."""
    from matplotlib.figure import Figure

    p = m["preference"]
    names = [k for k in p["models"] if k != p.get("reference")]
    crits = list(next(iter(p["models"].values())))
    fig = Figure(figsize=(6.5, 3.4))
    ax = fig.subplots()
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        cells = p["models"][name]
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(crits))]
        mid = [cells[c].get("margin_shift_mean") or 0.0 for c in crits]
        lo = [mid[i] - (cells[c].get("margin_shift_ci_low") or 0.0) for i, c in enumerate(crits)]
        hi = [(cells[c].get("margin_shift_ci_high") or 0.0) - mid[i] for i, c in enumerate(crits)]
        ax.bar(xs, mid, width=width, yerr=[lo, hi], capsize=3, label=name)
    ax.set_xticks(list(range(len(crits))), crits)
    ax.set_ylabel("margin shift vs base (nats/token)")
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_title(f"held-out preference pairs, {round(100 * p['level'])}% intervals", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def probe_shift_figure(m: Mapping[str, Any]) -> matplotlib.figure.Figure:
    """Bars of the base and trained self-probe readings per criterion (``probe_shift.png``), from the metrics."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    sp = m["self_probe"]
    crits = list(sp)
    xs = range(len(crits))
    ax.bar([x - 0.2 for x in xs], [sp[c]["base"] for c in crits], width=0.4, label="base")
    ax.bar([x + 0.2 for x in xs], [sp[c]["trained"] for c in crits], width=0.4, label="trained")
    ax.set_xticks(list(xs), crits)
    ax.set_ylabel("projection / spread (self-probe)")
    ax.set_title("self-probe: reads the directions that made the data", fontsize=9)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.legend()
    fig.tight_layout()
    return fig


# ---- gamma calibration -----------------------------------------------------------------------------------


def calibration_table(cal: Mapping[str, Any]) -> str:
    """Markdown: mean score etc. per gamma, the win-share matrix (rows gamma+, columns gamma-), the bootstrap.

    Args:
        cal: ``gamma_pos``, ``gamma_neg``, ``per_gamma``, ``pairs`` and ``settings`` (with ``scorer``
            and ``win_threshold``): `icon2_lens.CalibrationResult.to_dict`, i.e. ``calibration.json``.
            Optional parts are shown when present: per gamma ``push_share`` / ``push_gap`` (the summed
            push at the last steering layer), ``bootstrap`` (how often each pair is chosen over
            resamples), and in ``settings`` the sample (``sample``), ``n_boot``, and the scorer's
            held-out accuracy (``scorer_accuracy``).
    """
    gamma_pos, gamma_neg, per_gamma, pairs = cal["gamma_pos"], cal["gamma_neg"], cal["per_gamma"], cal["pairs"]
    settings = cal["settings"]
    push = all("push_share" in r for r in per_gamma)
    head = "| gamma | side | mean score | degenerate | distinct-2 |"
    lines = [head + (" push / resid norm | push / contrast gap |" if push else ""),
             "|---" * (7 if push else 5) + "|"]
    for r in per_gamma:
        mark = " *" if r["gamma"] in (gamma_pos, gamma_neg) else ""
        side = "+" if r["gamma"] > 0 else "-" if r["gamma"] < 0 else "0"
        row = (f"| {r['gamma']:g}{mark} | {side} | {r['mean_score']:.3f} | {r['degenerate_share']:.2f} | "
               f"{r['distinct2']:.2f} |")
        if push:
            row += f" {r['push_share']:.2f} | {r['push_gap']:.2f} |"
        lines.append(row)
    if push:
        lines += ["", "push: the norm of the vectors added at all steering layers, summed, at the last steering layer, "
                  "as a share of that layer's mean residual norm and as a multiple of the criterion's P+/P- "
                  "projection gap there (mean over the sample's rows)."]
    gn = sorted({p["gamma_neg"] for p in pairs}, reverse=True)
    gp = sorted({p["gamma_pos"] for p in pairs})
    win = {(p["gamma_pos"], p["gamma_neg"]): p["win_share"] for p in pairs}
    lines += ["", "share of pairs with chosen > rejected (rows gamma+, columns gamma-):", "",
              "| gamma+ \\ gamma- | " + " | ".join(f"{g:g}" for g in gn) + " |", "|---" * (len(gn) + 1) + "|"]
    for p in gp:
        cells = [f"**{win[(p, n)]:.2f}**" if (p, n) == (gamma_pos, gamma_neg) else f"{win[(p, n)]:.2f}" for n in gn]
        lines.append(f"| {p:g} | " + " | ".join(cells) + " |")
    boot = cal.get("bootstrap") or []
    if boot:
        n_boot = settings.get("n_boot", "")
        lines += ["", f"how often the rule picks each pair over {n_boot} resamples of the {settings.get('n', '')} "
                  "instructions (bootstrap):", "", "| gamma+ | gamma- | share |", "|---|---|---|"]
        for b in boot:
            chosen = (b["gamma_pos"], b["gamma_neg"]) == (gamma_pos, gamma_neg)
            cell = f"**{b['share']:.2f}**" if chosen else f"{b['share']:.2f}"
            lines.append(f"| {b['gamma_pos']:g} | {b['gamma_neg']:g} | {cell} |")
    sample = settings.get("sample")
    if sample:
        lines += ["", f"sample: {settings.get('n', len(sample.get('hashes', [])))} instructions drawn at random (seed "
                  f"{sample.get('seed')}) from the {sample.get('pool')} rows of {sample.get('source')}, "
                  f"{sample.get('excluded')} training rows left out."]
    scorer_line = _scorer_line(settings)
    if scorer_line:
        lines += ["", scorer_line]
    lines.append(f"\nchosen: gamma+ = {gamma_pos:g}, gamma- = {gamma_neg:g} "
                 f"(scorer {settings['scorer']}, win threshold {settings['win_threshold']})")
    return "\n".join(lines)


def _scorer_line(settings: Mapping[str, Any]) -> str:
    """What the scorer is: its held-out accuracy (reward probe), or the self-probe label."""
    if settings.get("scorer") == "self-probe":
        return ("scorer: *self-probe* (the model's reading along the steering directions themselves): circular, a "
                "manipulation check, not evidence of quality.")
    acc = settings.get("scorer_accuracy")
    if not acc:
        return ""
    per = ", ".join(f"{c} {v['accuracy']:.2f} (n={v['n']})" for c, v in acc.get("per_criterion", {}).items())
    level = acc.get("level", 0.9)
    return (f"scorer: {settings['scorer']}, preference accuracy on held-out human-written pairs "
            f"({acc.get('set', 'given')}): {acc['accuracy']:.2f} (n={acc['n']}, {level:.0%} interval "
            f"{acc['ci_low']:.2f}-{acc['ci_high']:.2f})" + (f"; {per}" if per else "") + " (0.5 = chance).")


def calibration_figure(cal: Mapping[str, Any]) -> matplotlib.figure.Figure:
    """Mean score and degenerate share per gamma; win share per gamma- for the chosen gamma+.

    Args:
        cal: as for `calibration_table`.
    """
    from matplotlib.figure import Figure

    gamma_pos, gamma_neg, per_gamma, settings = cal["gamma_pos"], cal["gamma_neg"], cal["per_gamma"], cal["settings"]
    fig = Figure(figsize=(10, 3.4))
    ax1, ax2 = fig.subplots(1, 2)
    g = [r["gamma"] for r in per_gamma]
    ax1.plot(g, [r["mean_score"] for r in per_gamma], marker="o", label="mean score")
    ax1b = ax1.twinx()
    ax1b.bar(g, [r["degenerate_share"] for r in per_gamma], width=0.008, color="tab:red", alpha=0.4,
             label="degenerate share")
    ax1b.set_ylim(0, 1)
    ax1.axvline(gamma_pos, color="tab:green", ls="--", lw=1)
    ax1.axvline(gamma_neg, color="tab:orange", ls="--", lw=1)
    ax1.set_xlabel("gamma")
    ax1.set_ylabel(f"mean score ({settings['scorer']})")
    ax1b.set_ylabel("degenerate share")
    ax1.set_title("score per gamma (dashed: chosen)")
    rows = sorted((p for p in cal["pairs"] if p["gamma_pos"] == gamma_pos), key=lambda p: p["gamma_neg"])
    ax2.plot([p["gamma_neg"] for p in rows], [p["win_share"] for p in rows], marker="o")
    ax2.axhline(settings["win_threshold"], color="0.5", ls="--", lw=1)
    ax2.set_ylim(-0.02, 1.02)
    ax2.set_xlabel("gamma-")
    ax2.set_ylabel("share chosen > rejected")
    ax2.set_title(f"pairs at gamma+ = {gamma_pos:g}")
    fig.tight_layout()
    return fig


# ---- layer report ----------------------------------------------------------------------------------------


def _grid(x: Grid) -> Tensor:
    """A ``[criterion, layer]`` float tensor; ``None`` in nested lists (``layer_report.json``) becomes NaN."""
    if isinstance(x, Tensor):
        return x
    return torch.tensor([[float("nan") if v is None else float(v) for v in row] for row in x])


def _layer_panels(
    heldout: Grid, paraphrase: Grid, response: Grid, stability: Grid | None
) -> list[tuple[str, str, Tensor]]:
    """(short name, title, data) per measure, in the report's order."""
    panels = [("a", "(a) held-out stimuli", _grid(heldout)), ("b", "(b) paraphrased prompts", _grid(paraphrase)),
              ("c", "(c) response pairs", _grid(response))]
    if stability is not None:
        panels.append(("stab", "split-half cosine", _grid(stability)))
    return panels


def _fmt(x: float) -> str:
    return "-" if x != x else f"{x:.2f}"


def _range_str(layers: Sequence[int]) -> str:
    contiguous = list(layers) == list(range(min(layers), max(layers) + 1))
    return f"{min(layers)}-{max(layers)}" if contiguous else str(list(layers))


def layer_table(criteria: Sequence[str], layers: Sequence[int], suggested_layers: Sequence[int], *, heldout: Grid,
                paraphrase: Grid, response: Grid, stability: Grid | None = None) -> str:
    """The layer report's Markdown table: one row per layer, one column per criterion and measure.

    Args:
        criteria: criterion names (rows of the grids).
        layers: model layers (columns of the grids).
        suggested_layers: marked with ``*`` and named below the table.
        heldout: separation (a) ``[criterion, layer]``.
        paraphrase: separation (b); NaN (or ``None``) shows as ``-``.
        response: separation (c).
        stability: optional split-half cosines (a ``stab`` column per criterion).
    """
    panels = _layer_panels(heldout, paraphrase, response, stability)
    head = ["layer"] + [f"{c} {s}" for c in criteria for s, _, _ in panels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for j, layer in enumerate(layers):
        mark = "*" if layer in suggested_layers else ""
        cells = [f"{layer}{mark}"]
        for ci in range(len(criteria)):
            cells += [_fmt(p[2][ci, j].item()) for p in panels]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"\\* suggested steering layers: {_range_str(suggested_layers)}")
    return "\n".join(lines)


def layer_figure(criteria: Sequence[str], layers: Sequence[int], suggested_layers: Sequence[int], *, heldout: Grid,
                 paraphrase: Grid, response: Grid, stability: Grid | None = None) -> matplotlib.figure.Figure:
    """One panel per measure, one line per criterion, the suggested range shaded (arguments as `layer_table`)."""
    from matplotlib.figure import Figure

    panels = _layer_panels(heldout, paraphrase, response, stability)
    fig = Figure(figsize=(4.2 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), sharex=True, squeeze=False)[0]
    lo, hi = min(suggested_layers), max(suggested_layers)
    for ax, (_, title, data) in zip(axes, panels, strict=True):
        ax.axvspan(lo - 0.5, hi + 0.5, color="0.9", zorder=0, label="suggested")
        for ci, c in enumerate(criteria):
            ax.plot(layers, data[ci].numpy(), marker=".", label=c)
        ax.set_title(title)
        ax.set_xlabel("layer")
        if "cosine" not in title:
            ax.axhline(0.5, color="0.5", lw=0.8, ls="--")
            ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("separation (share of pairs ordered right)")
    axes[-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


# ---- scoring ---------------------------------------------------------------------------------------------


def consistency_figure(criterion: Sequence[str], consistency: Sequence[float], *, names: Sequence[str] | None = None,
                       selected: Mapping[str, Sequence[float]] | None = None,
                       bins: int = 30) -> matplotlib.figure.Figure:
    """One histogram panel per criterion: consistency of the rows assigned to it, the selection cut drawn.

    Args:
        criterion: the assigned criterion per row.
        consistency: the consistency per row.
        names: the panels, in order (default: the criteria in order of first appearance).
        selected: the consistencies of the selected rows per criterion; a panel's cut is the lowest
            of its criterion's (with a global rule it is the same line in every panel).
        bins: histogram bins, shared by all panels (their edges span every row exactly).
    """
    from matplotlib.figure import Figure

    crit, cons = list(criterion), list(consistency)
    names = list(names) if names else sorted(set(crit), key=crit.index)
    fig = Figure(figsize=(3.6 * len(names), 3.0))
    axes = fig.subplots(1, len(names), squeeze=False, sharey=True)[0]
    lo, hi = min(cons), max(cons)
    edges = torch.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1, dtype=torch.float64).tolist()
    edges[0], edges[-1] = lo, max(hi, edges[-1])  # exact ends: every row falls in a bin
    sel_cons = dict(selected or {})
    for ax, name in zip(axes, names, strict=True):
        vals = [v for c, v in zip(crit, cons, strict=True) if c == name]
        ax.hist(vals, bins=edges, color="tab:blue", alpha=0.8)
        if sel_cons.get(name):
            ax.axvline(min(sel_cons[name]), color="tab:red", ls="--", lw=1.2,
                       label=f"kept: {len(sel_cons[name])}")
            ax.legend(fontsize=8)
        ax.set_title(f"{name} (n={len(vals)})")
        ax.set_xlabel("consistency")
    axes[0].set_ylabel("instructions")
    fig.tight_layout()
    return fig


# ---- costs -----------------------------------------------------------------------------------------------

_COST_FIELDS = ("stage", "prompt_tokens", "generated_tokens", "forward_passes", "wall_seconds", "peak_rss_mib", "rows")


def _cost_row(c: Any) -> dict[str, Any]:
    if isinstance(c, Mapping):
        return {k: c.get(k) for k in _COST_FIELDS}
    return {k: getattr(c, k) for k in _COST_FIELDS}


def cost_table(costs: Sequence[Any], *, per: tuple[str, int] | None = None) -> str:
    """A Markdown table of stage costs with a total row, and optionally the cost per output row.

    Args:
        costs: one row per stage, in order: a dict (``costs.json``) or a `icon2_lens.runs.StageCost`, with
            ``stage``, ``prompt_tokens``, ``generated_tokens``, ``forward_passes``, ``wall_seconds``,
            ``peak_rss_mib`` and ``rows`` (``None``: blank).
        per: ``(name, count)``, e.g. ``("kept pair", 24)``: adds a row dividing the total by ``count``.
    """
    rows = [_cost_row(c) for c in costs]
    head = ("| stage | prompt tokens | generated tokens | forward passes | wall s | peak RSS MiB | rows |\n"
            "|---|---|---|---|---|---|---|\n")
    lines = [f"| {c['stage']} | {c['prompt_tokens']:,} | {c['generated_tokens']:,} | {c['forward_passes']:,} | "
             f"{c['wall_seconds']:.1f} | {c['peak_rss_mib']:.0f} | {'' if c['rows'] is None else c['rows']} |"
             for c in rows]
    tp, tg, tf = (sum(c[k] for c in rows) for k in ("prompt_tokens", "generated_tokens", "forward_passes"))
    tw = sum(c["wall_seconds"] for c in rows)
    peak = max((c["peak_rss_mib"] for c in rows), default=0.0)
    lines.append(f"| **total** | {tp:,} | {tg:,} | {tf:,} | {tw:.1f} | {peak:.0f} | |")
    if per is not None and per[1] > 0:
        n = per[1]
        lines.append(f"| per {per[0]} ({n}) | {tp / n:,.0f} | {tg / n:,.0f} | {tf / n:,.1f} | {tw / n:.2f} | | |")
    return head + "\n".join(lines) + "\n"


def run_report(*, out: str, model: str, seed: int, order: Sequence[str], ran: Sequence[str], skipped: Sequence[str],
               costs: Sequence[Any], counts: Mapping[str, int | None], pair_summary: Mapping[str, Any] | None = None,
               train_history: Sequence[Mapping[str, Any]] | None = None, objective: str = "dpo",
               evaluation_md: str | None = None) -> str:
    """A run directory's ``report.md`` from plain data (the pipeline gathers it from the stage folders).

    Args:
        out: the run directory's name.
        model: the model's name.
        seed: the run's seed.
        order: the stages of this run, in order.
        ran: the stages run this time.
        skipped: the stages skipped as finished.
        costs: each stage's `icon2_lens.runs.costs.StageCost` (or its dict).
        counts: ``kept`` (synthesized instructions), ``selected``, ``pairs`` (``None``: not there).
        pair_summary: the generate stage's pair report (``report.json``), if any.
        train_history: the training log's rows, if any.
        objective: ``"dpo"`` or ``"simpo"`` (the training section's title).
        evaluation_md: the evaluate stage's ``report.md``, if any.
    """
    n_pairs = counts.get("pairs")
    total = sum(float(_cost_row(c)["wall_seconds"]) for c in costs)
    lines = [f"# icon2_lens run: {out}", "",
             f"Model: {model}; seed {seed}. Stages: {', '.join(order)}. Stage wall time summed: {total:.0f} s "
             f"({total / 60:.1f} min; this invocation ran {', '.join(ran) or 'nothing'}, "
             f"skipped {', '.join(skipped) or 'nothing'}).", "",
             "## Cost per stage", "",
             "Counted by `icon2_lens.measure_costs` (forward pre-hooks on the watched models; see docs/pipeline.md). "
             "A resumed stage counts the run that finished it.", "",
             cost_table(costs, per=("kept pair", n_pairs) if n_pairs else None)]
    if counts.get("selected") is not None:
        lines += ["## Data", "", f"- synthesized instructions kept: {counts.get('kept') or 0}",
                  f"- selected by consistency: {counts['selected']}",
                  f"- preference pairs: {n_pairs if n_pairs is not None else '-'}", ""]
    g = pair_summary or {}
    if "win_share" in g:
        lines += [f"*Self-probe* (read through the steering directions, not evidence of quality): chosen beats "
                  f"rejected ({g['scorer']}, neither degenerate) in {g['win_share']:.3f} of the pairs; degenerate: "
                  f"chosen {g['chosen']['degenerate_share']:.2f}, rejected {g['rejected']['degenerate_share']:.2f}.",
                  ""]
    if "reward_probe" in g:
        acc = g["reward_probe"]["heldout_accuracy"]
        lines += [f"Independent probe (a reward probe fitted on human-written better/worse answers, not on the "
                  f"steering directions): chosen beats rejected in {g['reward_probe']['win_share']:.3f} of the pairs; "
                  f"the probe itself ranks {acc['accuracy']:.2f} of the {acc['n']} held-out preference pairs right "
                  f"(90% interval {acc['ci_low']:.2f}-{acc['ci_high']:.2f}), so read it with that accuracy in mind.",
                  ""]
    if train_history:
        a, b = train_history[0], train_history[-1]
        lines += [f"## {objective.upper() if objective == 'dpo' else 'SimPO'} training", "",
                  f"{len(train_history)} logged steps: loss {a['loss']:.4f} -> {b['loss']:.4f}, reward accuracy "
                  f"{b.get('reward_accuracy', float('nan')):.2f}, margin {b.get('reward_margin', float('nan')):.3f}.",
                  "", "![training curve](train/trained_model/train_curve.png)", ""]
    if evaluation_md:
        head, body = evaluation_md.split("\n", 1)
        lines += [head.replace("# ", "## "), body.replace("## ", "### "),
                  "![preference margins](evaluate/preference.png)", ""]
    return "\n".join(lines)


def train_curve_figure(history: Sequence[Mapping[str, Any]], *,
                objective: str = "dpo") -> matplotlib.figure.Figure:
    """Loss, reward accuracy and reward margin per step (no pyplot, no global state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.2))
    axes = fig.subplots(1, 3)
    loss_title = {"dpo": "DPO loss", "simpo": "SimPO loss"}.get(objective, "loss")
    for ax, key, title in zip(axes, ("loss", "reward_accuracy", "reward_margin"),
                              (loss_title, "reward accuracy", "reward margin"), strict=True):
        pts = [(r["step"], r[key]) for r in history if key in r]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    return fig
