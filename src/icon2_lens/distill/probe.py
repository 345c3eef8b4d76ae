"""A probe-based self-evaluation: a direction in the residual stream that separates right answers from wrong ones.

Mind's Mirror has the teacher evaluate each of its rationales in text ("the given answer is correct | wrong |
uncertain"). This library adds a read-out of the same judgement from the model's activations, usable instead
of the text self-evaluation or beside it (issue 13, item 3):

1. each (question, rationale) is rendered as the chat exchange the student learns, user ``explain: <question>``
   and assistant ``<rationale> The answer is X.`` (`icon2_lens.distill.student.solution_text`), with no
   system prompt, and the residual stream (``resid_post`` by default) is read at its **last token**, the
   period that closes the answer sentence: the first position where the model has read the whole answer
   (`icon2_lens.activations.read_last_token`, as `icon2_lens.reward_probe` reads a response);
2. per layer (default: the middle third of the model, `icon2_lens.reward_probe.middle_third`) the direction is
   the unit **difference of the class means**, right minus wrong (deterministic, no optimiser: with a few
   hundred rationales in hundreds of dimensions a mean difference is the low-variance choice; a logistic fit
   would overfit and need a regulariser to tune). The projections are centred on the midpoint of the two class
   means and scaled by the pooled within-class standard deviation;
3. a score is the mean over layers of that standardised projection: above 0 reads "right", below "wrong".

Fit it on a training split with gold answers and check it with `AnswerProbe.agreement` on held-out questions;
`agreement` also reports rows whose question was among the fitting ones (``n_seen_questions``), which should
be 0 for an honest check. Like `icon2_lens.reward_probe.RewardProbeScorer` it is linear and reads the model's
own residual stream: it can only find what the model already represents about its answer.

Examples:
    >>> probe = AnswerProbe.fit(teacher, train_rows)  # doctest: +SKIP
    >>> probe.agreement(test_rows)["accuracy"]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..activations import read_last_token, resolve_layers
from ..models import LoadedModel
from ..prompts import render_chat, require_chat_template
from ..reward_probe import middle_third, wilson_interval
from .student import explain_prompt, solution_text

__all__ = ["AnswerProbe", "fit_answer_direction", "probe_rows"]

#: A row: a dict or object with ``question``, ``rationale`` (ending "The answer is X.", or with an ``answer``
#: field to add it) and ``correct`` (or ``rationale_correct``), or a ``(question, solution, correct)`` tuple.
ProbeRow = Mapping[str, Any] | tuple[str, str, bool] | Any


def probe_rows(rows: Sequence[ProbeRow], *, need_correct: bool = True) -> list[tuple[str, str, bool | None]]:
    """Rows as ``(question, solution text, correct)``.

    Examples:
        >>> probe_rows([{"question": "2 + 3?", "rationale": "2 + 3 = 5.", "answer": "5", "correct": True}])
        [('2 + 3?', '2 + 3 = 5. The answer is 5.', True)]
    """
    out: list[tuple[str, str, bool | None]] = []
    for r in rows:
        if isinstance(r, tuple):
            if len(r) != 3:
                raise ValueError(f"A probe row tuple must be (question, solution, correct), got {r!r}.")
            q, text, ok = r
        else:
            get = r.get if isinstance(r, Mapping) else (lambda k, d=None, _r=r: getattr(_r, k, d))
            q, rationale = get("question"), get("rationale")
            if q is None or rationale is None:
                raise ValueError(f"A probe row needs 'question' and 'rationale', got {r!r}.")
            text = solution_text(str(rationale), get("answer"))
            ok = get("correct")
            if ok is None:
                ok = get("rationale_correct")
        if ok is None and need_correct:
            raise ValueError(f"A probe row needs 'correct' (or 'rationale_correct'): whether its answer is right; "
                             f"got {r!r}.")
        out.append((str(q), str(text), None if ok is None else bool(ok)))
    return out


def fit_answer_direction(
    h: Float[Tensor, "n layer d_model"], correct: Bool[Tensor, " n"]
) -> tuple[Float[Tensor, "layer d_model"], Float[Tensor, " layer"], Float[Tensor, " layer"]]:
    """Per layer: the unit difference of class means (right minus wrong), the midpoint of the two classes'
    mean projections, and the pooled within-class standard deviation of the projections.

    Pure tensor math (the part of `AnswerProbe.fit` after reading the model).

    Examples:
        >>> h = torch.tensor([[[3.0, 0.0]], [[1.0, 1.0]], [[-1.0, 0.0]], [[-3.0, 1.0]]])
        >>> u, mid, scale = fit_answer_direction(h, torch.tensor([True, True, False, False]))
        >>> u.tolist(), mid.tolist(), scale.tolist()
        ([[1.0, 0.0]], [0.0], [1.0])
    """
    if h.dim() != 3 or correct.shape != (h.shape[0],):
        raise ValueError(f"h must be [n, layer, d_model] and correct [n], got {tuple(h.shape)} and "
                         f"{tuple(correct.shape)}.")
    n_right, n_wrong = int(correct.sum()), int((~correct).sum())
    if n_right == 0 or n_wrong == 0:
        raise ValueError(f"The answer probe needs rationales with right and with wrong answers to tell apart; got "
                         f"{n_right} right and {n_wrong} wrong. Fit it on more questions (or a harder split) so "
                         "that both kinds occur.")
    hd = h.double()
    m1, m0 = hd[correct].mean(0), hd[~correct].mean(0)
    diff = m1 - m0
    norm = diff.norm(dim=-1, keepdim=True)
    if not torch.isfinite(norm).all() or (norm == 0).any():
        raise ValueError("Right and wrong rationales read the same at some layer: no direction exists.")
    u = diff / norm
    proj = torch.einsum("nld,ld->nl", hd, u)
    p1, p0 = proj[correct], proj[~correct]
    mid = (p1.mean(0) + p0.mean(0)) / 2
    within = torch.cat([p1 - p1.mean(0), p0 - p0.mean(0)])
    scale = within.pow(2).mean(0).sqrt().clamp_min(1e-6)
    return u.float(), mid.float(), scale.float()


def _auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    pos = torch.tensor([s for s, y in zip(scores, labels, strict=True) if y], dtype=torch.float64)
    neg = torch.tensor([s for s, y in zip(scores, labels, strict=True) if not y], dtype=torch.float64)
    if len(pos) == 0 or len(neg) == 0:
        return None
    cmp = pos[:, None] - neg[None, :]
    return float(((cmp > 0).double() + 0.5 * (cmp == 0).double()).mean())


class AnswerProbe:
    """A linear read-out of "this rationale's answer is right" from the residual stream at the answer.

    Make one with `AnswerProbe.fit`. See the module docs for what it reads and how it is fitted.

    Attributes:
        model: the model that reads (the teacher, or the student).
        layers: the layers read.
        hook: the residual hook kind.
        vectors: ``[layer, d_model]`` unit directions (right minus wrong).
        mid: ``[layer]`` the midpoint of the classes' mean projections (the decision boundary).
        scale: ``[layer]`` the pooled within-class standard deviation of the projections.
        n_fit: rationales fitted on, ``{"right": ..., "wrong": ...}``.
        fit_questions: the questions of the fitting rows (to flag overlap in `agreement`).

    Examples:
        >>> rows = [("2 + 3?", "The answer is 5.", True), ("2 + 3?", "The answer is 7.", False)]
        >>> probe = AnswerProbe.fit(model, rows)  # doctest: +SKIP
        >>> probe.probe([("2 + 4?", "The answer is 6.", True)])  # doctest: +SKIP
        [0.8]
    """

    name = "answer_probe"

    def __init__(self, model: LoadedModel, *, layers: Sequence[int], vectors: Float[Tensor, "layer d_model"],
                 mid: Float[Tensor, " layer"], scale: Float[Tensor, " layer"], hook: str = "resid_post",
                 batch_size: int = 16, n_fit: Mapping[str, int] | None = None,
                 fit_questions: Sequence[str] = ()) -> None:
        if vectors.shape != (len(layers), model.d_model) or mid.shape != (len(layers),) or scale.shape != mid.shape:
            raise ValueError("vectors, mid and scale must be [layer, d_model], [layer] and [layer] for the layers.")
        self.model, self.layers, self.hook = model, list(layers), hook
        self.vectors, self.mid, self.scale = vectors, mid, scale
        self.batch_size = batch_size
        self.n_fit = dict(n_fit or {})
        self.fit_questions = frozenset(fit_questions)

    @classmethod
    def fit(cls, model: LoadedModel, rows: Sequence[ProbeRow], *, layers: Sequence[int] | range | None = None,
            hook: str = "resid_post", batch_size: int = 16, progress: bool = False) -> AnswerProbe:
        """Fit the probe on rationales with known right/wrong answers.

        Args:
            model: the model whose residual stream is read (the teacher, by the issue's design).
            rows: ``(question, solution, correct)`` tuples, or rows with ``question``, ``rationale`` (with
                ``answer`` where the rationale lacks its answer sentence, as the teacher's rationale dataset
                has it) and ``correct`` / ``rationale_correct``; both right and wrong ones are needed.
            layers: layers to read (default: the middle third of the model).
            hook: residual hook kind.
            batch_size: texts per forward pass.
            progress: progress bar while reading.

        Raises:
            ValueError: with no rows, or when all rows are right or all wrong (nothing to separate).
        """
        require_chat_template(model.tokenizer)
        triples = probe_rows(rows)
        if not triples:
            raise ValueError("No rows to fit the answer probe on; pass rationales with their right/wrong flag.")
        correct = torch.tensor([bool(ok) for _, _, ok in triples])
        if bool(correct.all()) or not bool(correct.any()):
            n = len(triples)
            raise ValueError(f"The answer probe needs rationales with right and with wrong answers to tell apart; "
                             f"all {n} fitting rows are {'right' if bool(correct.all()) else 'wrong'}. Fit it on "
                             "more questions (or a harder split) so that both kinds occur.")
        layer_list = resolve_layers(model, list(layers) if layers is not None else middle_third(model.n_layers))
        h = read_last_token(model, cls._texts(model, triples), hook=hook, layers=layer_list, batch_size=batch_size,
                            progress=progress, desc="answer probe")
        u, mid, scale = fit_answer_direction(h, correct)
        return cls(model, layers=layer_list, vectors=u, mid=mid, scale=scale, hook=hook, batch_size=batch_size,
                   n_fit={"right": int(correct.sum()), "wrong": int((~correct).sum())},
                   fit_questions=[q for q, _, _ in triples])

    @staticmethod
    def _texts(model: LoadedModel, triples: Sequence[tuple[str, str, bool | None]]) -> list[str]:
        tok = model.tokenizer
        return [render_chat(tok, explain_prompt(q), assistant=text if text.strip() else " ") for q, text, _ in triples]

    def scores(self, h: Float[Tensor, "n layer d_model"]) -> Float[Tensor, " n"]:
        """The probe's score of read residuals: the mean over layers of the standardised, centred projection."""
        proj = torch.einsum("nld,ld->nl", h.float(), self.vectors.float())
        return ((proj - self.mid) / self.scale).mean(-1)

    def probe(self, rows: Sequence[ProbeRow]) -> list[float]:
        """Scores of rows (the ``correct`` flag is not needed): above 0 reads "right", below "wrong"."""
        triples = probe_rows(rows, need_correct=False)
        if not triples:
            return []
        h = read_last_token(self.model, self._texts(self.model, triples), hook=self.hook, layers=self.layers,
                            batch_size=self.batch_size, progress=False)
        return self.scores(h).tolist()

    def labels(self, rows: Sequence[ProbeRow], *, threshold: float = 0.0) -> list[Literal["correct", "wrong"]]:
        """The probe's verdict per row, in the text self-evaluation's words (``"correct"`` above ``threshold``)."""
        return ["correct" if s > threshold else "wrong" for s in self.probe(rows)]

    def agreement(self, rows: Sequence[ProbeRow], *, level: float = 0.9) -> dict[str, Any]:
        """How often the probe's verdict (score > 0: right) agrees with gold, on held-out rows.

        Returns:
            ``accuracy``, ``n``, ``correct`` (agreeing rows), ``ci_low``, ``ci_high`` (Wilson, ``level``),
            ``level``, ``auc`` (how well the scores rank right above wrong answers, threshold-free; ``None``
            with one class), ``per_class`` (``{"right": {accuracy, n}, "wrong": {accuracy, n}}``) and
            ``n_seen_questions`` (rows whose question was among the fitting rows: 0 for a held-out check).
        """
        triples = probe_rows(rows)
        if not triples:
            raise ValueError("No rows to measure the answer probe on.")
        s = self.probe(triples)
        gold = [bool(ok) for _, _, ok in triples]
        hits = [(x > 0) == y for x, y in zip(s, gold, strict=True)]
        k = sum(hits)
        lo, hi = wilson_interval(k, len(hits), level=level)
        per = {}
        for name, want in (("right", True), ("wrong", False)):
            idx = [i for i, y in enumerate(gold) if y == want]
            per[name] = {"accuracy": sum(hits[i] for i in idx) / len(idx) if idx else float("nan"), "n": len(idx)}
        return {"accuracy": k / len(hits), "n": len(hits), "correct": k, "ci_low": lo, "ci_high": hi, "level": level,
                "auc": _auc(s, gold), "per_class": per,
                "n_seen_questions": sum(q in self.fit_questions for q, _, _ in triples)}

    def describe(self) -> dict[str, Any]:
        """What this probe is (for settings and metrics files): name, layers, hook, fitting counts."""
        return {"name": self.name, "layers": self.layers, "hook": self.hook, "n_fit": self.n_fit,
                "method": "difference of class means, centred on the class midpoint, pooled within-class std"}
