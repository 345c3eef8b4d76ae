"""A reward probe that did not make the data: a linear read-out of answer quality, fitted on human-written pairs.

Calibrating gamma with the steering directions themselves (`icon2_lens.judges.ProbeScorer`) is
circular: steering along ``u`` and then finding more ``u`` is a manipulation check (EVIDENCE.md).
`RewardProbeScorer` is the offline default that avoids it. It is fitted on the project's
human-written better/worse answers to the same questions (`icon2_lens.layers.builtin_response_pairs`:
(question, good answer, bad answer) per criterion), not on the system-prompt contrasts that give the
steering directions:

1. the model reads each chat-rendered (question, answer) with no system prompt; the last token's
   residual (``resid_post`` by default) is kept at the layers of a middle window (default: the
   middle third of the model; `icon2_lens.calibrate_gamma` passes its steering layers);
2. per layer, the direction is the normalised mean of ``h_good - h_bad`` (deterministic, no
   optimiser; with ~100 pairs in hundreds of dimensions a mean difference is the low-variance
   choice), and the projections of all fitting texts give a mean and standard deviation;
3. the score of a (question, answer) is the mean over layers of the standardised projection.

By default the probe is **pooled**: one "better answer" direction per layer from the pairs of all
criteria, so it scores every response the same way whatever it was steered along. With
``mode="per_criterion"`` each criterion gets its own direction (fitted on its own pairs) and a
response is scored along its row's criterion.

**Limits.** It reads the same model's residual stream, so it shares that model's blind spots, and it
is linear and small: it is a better-than-circular offline signal, not a judge. Check it with
`RewardProbeScorer.accuracy` on a held-out preference set (`icon2_lens.preference.load_preference_set`:
human-written pairs disjoint from the fitting pairs) before trusting its calibration; a user-named
reward model (`icon2_lens.judges.RewardModelScorer`) or judge is the stronger choice when there is one.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

import torch
from jaxtyping import Float
from torch import Tensor

from .activations import read_last_token, resolve_layers
from .directions import DirectionSet
from .layers import ResponsePair, builtin_response_pairs
from .math.probe import probe_scores
from .models import LoadedModel
from .prompts import render_chat, require_chat_template

__all__ = ["RewardProbeScorer", "ProbeMode", "PreferenceLike", "fit_probe", "middle_third", "wilson_interval"]

#: ``"pooled"``: one direction per layer from every criterion's pairs; ``"per_criterion"``: one per criterion.
ProbeMode = Literal["pooled", "per_criterion"]
_POOLED = "all"


class PreferenceLike(Protocol):
    """One held-out preference pair (e.g. `icon2_lens.preference.PreferencePair`)."""

    @property
    def prompt(self) -> str: ...
    @property
    def chosen(self) -> str: ...
    @property
    def rejected(self) -> str: ...
    @property
    def criterion(self) -> str: ...


def middle_third(n_layers: int) -> list[int]:
    """The middle third of ``n_layers`` layers (at least one layer).

    Examples:
        >>> middle_third(30), middle_third(4)
        ([10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [1])
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be positive, got {n_layers}.")
    width = max(1, round(n_layers / 3))
    start = (n_layers - width) // 2
    return list(range(start, start + width))


def fit_probe(
    good: Float[Tensor, "n layer d_model"], bad: Float[Tensor, "n layer d_model"]
) -> tuple[Float[Tensor, "layer d_model"], Float[Tensor, " layer"], Float[Tensor, " layer"]]:
    """Per layer: the unit mean of ``good - bad``, and the mean and std of all fitting projections on it.

    Pure tensor math (the part of `RewardProbeScorer.fit` after reading the model).

    Examples:
        >>> good = torch.tensor([[[2.0, 0.0]], [[4.0, 1.0]]]); bad = torch.tensor([[[0.0, 0.0]], [[0.0, 1.0]]])
        >>> u, mean, std = fit_probe(good, bad)
        >>> u.tolist(), mean.tolist(), round(std.item(), 4)
        ([[1.0, 0.0]], [1.5], 1.6583)
    """
    if good.shape != bad.shape or good.dim() != 3 or good.shape[0] == 0:
        raise ValueError(f"good and bad must be [n > 0, layer, d_model] of one shape, got {tuple(good.shape)} and "
                         f"{tuple(bad.shape)}.")
    diff = (good.double() - bad.double()).mean(0)  # [layer, d]
    norm = diff.norm(dim=-1, keepdim=True)
    if not torch.isfinite(norm).all() or (norm == 0).any():
        raise ValueError("The good and bad answers read the same at some layer: no direction exists.")
    u = diff / norm
    proj = torch.einsum("nld,ld->nl", torch.cat([good, bad]).double(), u)
    return u.float(), proj.mean(0).float(), proj.std(0, unbiased=False).clamp_min(1e-6).float()


def wilson_interval(successes: int, n: int, *, level: float = 0.9) -> tuple[float, float]:
    """The Wilson score interval of a share (two-sided, ``level`` coverage).

    Examples:
        >>> lo, hi = wilson_interval(30, 40)
        >>> round(lo, 3), round(hi, 3)
        (0.624, 0.844)
    """
    if n <= 0:
        raise ValueError("No trials.")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    z = _normal_quantile(0.5 + level / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _normal_quantile(q: float) -> float:
    return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(q, dtype=torch.float64)))


class RewardProbeScorer:
    """A linear reward probe on the model's residual stream, fitted on human-written better/worse answers.

    Make one with `RewardProbeScorer.fit`; it is a pointwise `icon2_lens.judges.Scorer`
    (``name = "reward_probe"``): ``scorer(instructions, responses, criteria) -> list[float]``, higher is
    better. See the module docs for what it is and its limits.

    Attributes:
        layers: the layers read.
        hook: the residual hook kind.
        mode: ``"pooled"`` or ``"per_criterion"``.
        groups: ``["all"]`` (pooled) or the criteria fitted.
        vectors: ``[group, layer, d_model]`` unit directions.
        mean: ``[group, layer]`` mean projection of the fitting texts.
        std: ``[group, layer]`` their standard deviation.
        fit_counts: pairs fitted on, per criterion.
        fit_sha256: a hash of the fitting pairs (to tell probes apart).

    Examples:
        >>> rp = RewardProbeScorer.fit(model)  # doctest: +SKIP
        >>> rp(["Name a river."], ["The Nile."], ["helpful"])  # doctest: +SKIP
        [0.41]
        >>> rp.accuracy(il.preference.load_preference_set())["accuracy"]  # doctest: +SKIP
    """

    name = "reward_probe"

    def __init__(self, model: LoadedModel, *, layers: Sequence[int], vectors: Float[Tensor, "group layer d_model"],
                 mean: Float[Tensor, "group layer"], std: Float[Tensor, "group layer"], groups: Sequence[str],
                 mode: ProbeMode = "pooled", hook: str = "resid_post", batch_size: int = 16,
                 fit_counts: Mapping[str, int] | None = None, fit_sha256: str = "") -> None:
        if mode not in ("pooled", "per_criterion"):
            raise ValueError(f"Unknown mode {mode!r}; use 'pooled' or 'per_criterion'.")
        shape = (len(groups), len(layers))
        if vectors.shape[:2] != shape or mean.shape != shape or std.shape != shape:
            raise ValueError("vectors, mean and std must be [group, layer(, d_model)] for the given groups and layers.")
        self.model, self.layers, self.hook, self.mode = model, list(layers), hook, mode
        self.groups, self.vectors, self.mean, self.std = list(groups), vectors, mean, std
        self.batch_size = batch_size
        self.fit_counts = dict(fit_counts or {})
        self.fit_sha256 = fit_sha256

    @classmethod
    def fit(cls, model: LoadedModel, *, layers: Sequence[int] | range | None = None,
            pairs: Mapping[str, Sequence[ResponsePair]] | None = None, mode: ProbeMode = "pooled",
            hook: str = "resid_post", batch_size: int = 16, progress: bool = False) -> RewardProbeScorer:
        """Fit the probe on (question, good answer, bad answer) triples per criterion.

        Args:
            model: the model that reads (the one whose steered answers will be scored).
            layers: layers to read (default: the middle third of the model).
            pairs: ``{criterion: [(question, good, bad), ...]}`` (default: the built-in human-written
                response pairs, `icon2_lens.layers.builtin_response_pairs`).
            mode: ``"pooled"`` (default: one direction from all pairs) or ``"per_criterion"``.
            hook: residual hook kind.
            batch_size: texts per forward pass.
            progress: progress bar while reading.
        """
        require_chat_template(model.tokenizer)
        if mode not in ("pooled", "per_criterion"):
            raise ValueError(f"Unknown mode {mode!r}; use 'pooled' or 'per_criterion'.")
        pairs = builtin_response_pairs() if pairs is None else {c: list(v) for c, v in pairs.items() if v}
        if not pairs:
            raise ValueError("No response pairs to fit the reward probe on; pass {criterion: [(question, good, bad)]}.")
        layer_list = resolve_layers(model, list(layers) if layers is not None else middle_third(model.n_layers))
        tok = model.tokenizer
        order = [(c, t) for c in sorted(pairs) for t in pairs[c]]
        texts = ([render_chat(tok, q, assistant=g) for _, (q, g, _) in order]
                 + [render_chat(tok, q, assistant=b) for _, (q, _, b) in order])
        h = read_last_token(model, texts, hook=hook, layers=layer_list, batch_size=batch_size, progress=progress,
                            desc="reward probe")
        good, bad = h[:len(order)], h[len(order):]
        crit_of = [c for c, _ in order]
        groups = [_POOLED] if mode == "pooled" else sorted(pairs)
        fits = []
        for g in groups:
            idx = [i for i, c in enumerate(crit_of) if g == _POOLED or c == g]
            fits.append(fit_probe(good[idx], bad[idx]))
        blob = json.dumps([[c, *t] for c, t in order]).encode("utf-8")
        return cls(model, layers=layer_list, vectors=torch.stack([f[0] for f in fits]),
                   mean=torch.stack([f[1] for f in fits]), std=torch.stack([f[2] for f in fits]), groups=groups,
                   mode=mode, hook=hook, batch_size=batch_size,
                   fit_counts={c: len(v) for c, v in sorted(pairs.items())},
                   fit_sha256=hashlib.sha256(blob).hexdigest())

    def _group_index(self, criteria: Sequence[str]) -> list[int]:
        if self.mode == "pooled":
            return [0] * len(criteria)
        missing = sorted({c for c in criteria if c not in self.groups})
        if missing:
            raise ValueError(f"The reward probe has no direction for {missing} (fitted per criterion on "
                             f"{self.groups}); fit it on pairs of those criteria or use mode='pooled'.")
        return [self.groups.index(c) for c in criteria]

    def __call__(self, instructions: Sequence[str], responses: Sequence[str], criteria: Sequence[str]) -> list[float]:
        if not len(instructions) == len(responses) == len(criteria):
            raise ValueError("instructions, responses and criteria must have the same length.")
        if not instructions:
            return []
        gi = torch.tensor(self._group_index(criteria))
        tok = self.model.tokenizer
        texts = [render_chat(tok, q, assistant=r if r.strip() else " ")
                 for q, r in zip(instructions, responses, strict=True)]
        h = read_last_token(self.model, texts, hook=self.hook, layers=self.layers, batch_size=self.batch_size,
                            progress=False)
        z = probe_scores(h, self.vectors, mean=self.mean, std=self.std)  # [n, group]
        return z[torch.arange(len(texts)), gi].tolist()

    def accuracy(self, pairs: Sequence[PreferenceLike], *, level: float = 0.9) -> dict[str, Any]:
        """Preference accuracy on held-out pairs: the share where score(chosen) > score(rejected).

        Args:
            pairs: objects with ``prompt``, ``chosen``, ``rejected`` and ``criterion`` (e.g.
                `icon2_lens.preference.load_preference_set`'s); with ``mode="per_criterion"`` every
                pair's criterion must have been fitted.
            level: coverage of the Wilson intervals.

        Returns:
            ``accuracy``, ``n``, ``ci_low``, ``ci_high``, ``level``, and ``per_criterion``:
            ``{criterion: {accuracy, n, ci_low, ci_high}}``. A tie counts as a miss.
        """
        pairs = list(pairs)
        if not pairs:
            raise ValueError("No preference pairs to measure the reward probe on.")
        qs = [p.prompt for p in pairs]
        crits = [p.criterion for p in pairs]
        scores = self(qs + qs, [p.chosen for p in pairs] + [p.rejected for p in pairs], crits + crits)
        wins = [a > b for a, b in zip(scores[:len(pairs)], scores[len(pairs):], strict=True)]

        def cell(idx: list[int]) -> dict[str, Any]:
            k = sum(wins[i] for i in idx)
            lo, hi = wilson_interval(k, len(idx), level=level)
            return {"accuracy": k / len(idx), "n": len(idx), "ci_low": lo, "ci_high": hi}

        per = {c: cell([i for i, x in enumerate(crits) if x == c]) for c in sorted(set(crits))}
        return {**cell(list(range(len(pairs)))), "level": level, "per_criterion": per}

    def cosine_with(self, directions: DirectionSet) -> dict[str, float]:
        """Mean cosine (over the layers both have) between this probe's direction and each criterion's.

        How far the probe is from the steering directions: near 1 it reads what steering pushes.
        Per criterion, against the pooled direction or that criterion's own (``per_criterion``).
        """
        common = [x for x in self.layers if x in directions.layers]
        if not common:
            return {}
        mine = [self.layers.index(x) for x in common]
        theirs = [directions.layers.index(x) for x in common]
        out = {}
        for c in directions.criteria:
            if self.mode == "per_criterion" and c not in self.groups:
                continue
            g = 0 if self.mode == "pooled" else self.groups.index(c)
            a = self.vectors[g, mine].double()
            b = directions.vectors[directions.index(c), theirs].double()
            out[c] = float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())
        return out

    def describe(self) -> dict[str, Any]:
        """What this probe is (for settings files): name, mode, layers, hook, fitting pairs and their hash."""
        return {"name": self.name, "mode": self.mode, "layers": self.layers, "hook": self.hook,
                "fit_pairs": self.fit_counts, "fit_sha256": self.fit_sha256}
