"""Pointwise scorers and pairwise judges: two protocols and their implementations.

A **scorer** (`Scorer`) scores each response on its own: ``scorer(instructions, responses,
criteria) -> list[float]``, higher is better; ``criteria[i]`` is the criterion response ``i`` was
steered along. A **judge** (`Judge`) compares two responses to the same instruction:
``judge.compare(instructions, a, b) -> list[float]``, 1.0 when ``a`` is better in both orders,
0.0 when ``b`` is, 0.5 when the verdict flips with the order (a tie), and ``judge.orders(...)``
gives the raw verdicts of the two orders. `is_pairwise` tells which one an object is;
`icon2_lens.calibrate_gamma`, `icon2_lens.evaluation.pair_report` and `icon2_lens.evaluate`
take either.

* `ProbeScorer` (default, offline, works on the embedded model): the model reads the response to
  the instruction (chat template, no system prompt of our own) and the last token's residual is
  projected on the criterion's direction at the steering layers, standardised with the feature-set
  statistics and averaged: the response-reading of the layer report's measure (c). **Limits:** it
  measures how much the *model itself* reads the answer as e.g. helpful, along the same direction
  that steering pushes, so it is not an independent judge: it rewards text that moves the probe
  and knows nothing about correctness. The layer report shows where it can be trusted: (c) was
  0.8-0.9 for *helpful*/*general* at the suggested layers on SmolLM2, but *below chance* for
  *harmless*. Use a reward model or a judge for claims about quality.
* `RewardModelScorer`: any HF sequence-classification reward model (``logits[:, 0]``).
* `PairwiseJudge`: a chat model asked which of two responses is better, both orders; a verdict
  that flips with the order counts as a tie (0.5). It reads next-token logits through the engine
  seam (`icon2_lens.gen.engine`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol, TypeGuard, runtime_checkable

import torch

from .activations import LastTokenReader, tokenize_texts
from .directions import DirectionSet
from .gen import engine
from .math.probe import probe_scores
from .models import LoadedModel
from .prompts import render_chat

__all__ = ["Scorer", "Judge", "ProbeScorer", "RewardModelScorer", "PairwiseJudge", "verdicts", "is_pairwise"]


@runtime_checkable
class Scorer(Protocol):
    """Scores responses one by one: higher is better. ``criteria[i]`` is the criterion response ``i`` was steered along.

    Examples:
        >>> class Length:
        ...     name = "length"
        ...     def __call__(self, instructions, responses, criteria):
        ...         return [float(len(r)) for r in responses]
        >>> isinstance(Length(), Scorer)
        True
    """

    name: str

    def __call__(self, instructions: Sequence[str], responses: Sequence[str], criteria: Sequence[str]) -> list[float]:
        ...


@runtime_checkable
class Judge(Protocol):
    """Compares two responses per instruction, in both orders (see the module docs).

    ``compare`` returns 1.0 / 0.0 / 0.5 per item (``a`` better in both orders / ``b`` better /
    the verdict flips with the order); ``orders`` returns the raw verdicts (whether the first shown
    response wins with ``a`` first, and with ``b`` first), so that ``compare`` is
    ``verdicts(*orders(...))``.
    """

    name: str

    def compare(self, instructions: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        ...

    def orders(self, instructions: Sequence[str], a: Sequence[str], b: Sequence[str]) -> tuple[list[bool], list[bool]]:
        ...


def verdicts(ab: Sequence[bool], ba: Sequence[bool]) -> list[float]:
    """Combine the verdicts of both orders: 1.0 if ``a`` wins in both, 0.0 if ``b`` does, else 0.5.

    ``ab[i]``: the judge picked the first shown response with ``a`` first; ``ba[i]``: with ``b`` first.

    Examples:
        >>> verdicts([True, False, True, False], [False, True, True, False])
        [1.0, 0.0, 0.5, 0.5]
    """
    return [1.0 if x and not y else 0.0 if y and not x else 0.5 for x, y in zip(ab, ba, strict=True)]


def is_pairwise(scorer: Any) -> TypeGuard[Judge]:
    """Whether ``scorer`` is used as a judge (it has ``compare``) rather than as a pointwise scorer.

    Any object with a ``compare`` method counts (a `Judge`; ``orders`` is optional, `icon2_lens.evaluate`
    uses it for the judge's position bias when present).

    Examples:
        >>> is_pairwise(PairwiseJudge.__new__(PairwiseJudge)), is_pairwise(lambda qs, rs, cs: [0.0] * len(rs))
        (True, False)
    """
    return hasattr(scorer, "compare")


class ProbeScorer:
    """The model's own reading of a response along the criterion's direction (see the module docs).

    Args:
        model: the model that reads (the one the directions come from).
        directions: the probes.
        layers: layers to average (default: the directions' suggested layers, else all).
        batch_size: prompts per forward pass.

    Examples:
        >>> scorer = ProbeScorer(model, dirs)  # doctest: +SKIP
        >>> scorer(["Name a river."], ["The Nile."], ["helpful"])  # doctest: +SKIP
        [0.83]
    """

    name = "probe"

    def __init__(self, model: LoadedModel, directions: DirectionSet, *, layers: Sequence[int] | None = None,
                 batch_size: int = 16) -> None:
        directions.check_compatible(model)
        self.model, self.directions, self.batch_size = model, directions, batch_size
        self.layers = list(layers or directions.suggested_layers or directions.layers)
        missing = [x for x in self.layers if x not in directions.layers]
        if missing:
            raise ValueError(f"Layers {missing} are not in the directions (which have {list(directions.layers)}).")

    def __call__(self, instructions: Sequence[str], responses: Sequence[str], criteria: Sequence[str]) -> list[float]:
        if not len(instructions) == len(responses) == len(criteria):
            raise ValueError("instructions, responses and criteria must have the same length.")
        d = self.directions
        cols = [d.layers.index(x) for x in self.layers]
        tok = self.model.tokenizer
        texts = [render_chat(tok, q, assistant=r if r.strip() else " ")
                 for q, r in zip(instructions, responses, strict=True)]
        ids = tokenize_texts(self.model, texts)
        ci = torch.tensor([d.index(c) for c in criteria])
        out = torch.empty(len(texts))
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        with LastTokenReader(self.model, hook=d.hook, layers=self.layers) as reader:
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                h = reader.read([ids[i] for i in rows])
                z = probe_scores(h, d.vectors[:, cols], mean=d.stats["proj_mean"][:, cols],
                                 std=d.stats["proj_std"][:, cols])  # [b, criterion]
                out[rows] = z[torch.arange(len(rows)), ci[rows]]
        return out.tolist()


class RewardModelScorer:
    """An HF sequence-classification reward model; the score is ``logits[:, 0]``.

    The (instruction, response) pair is rendered with the reward model's chat template when it has
    one, else as ``"instruction\\n\\nresponse"``. Offline by default (``local_files_only=True``).
    Batches are padded: a tokenizer without a pad token pads with its end-of-sequence token, and a
    model config without ``pad_token_id`` gets the tokenizer's (the classifier finds each row's
    last token through it; without one, HF refuses batches of more than one row).

    Examples:
        >>> scorer = RewardModelScorer("path/to/reward-model")  # doctest: +SKIP
    """

    name = "reward_model"

    def __init__(self, source: str | os.PathLike[str], *, device: str | None = None, batch_size: int = 8,
                 local_files_only: bool = True) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=local_files_only)
            self.model = AutoModelForSequenceClassification.from_pretrained(str(source),
                                                                            local_files_only=local_files_only)
        except OSError as exc:
            raise FileNotFoundError(f"Cannot load a reward model from {source!r} ({exc}); pass a local folder of an HF "
                                    "sequence-classification model (or allow downloads).") from exc
        self.model.eval().to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"The reward model's tokenizer at {source!r} has neither a pad nor an end-of-sequence "
                                 "token, so batches cannot be padded; give it a pad token.")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:  # our own copy of the model: set it, or batches > 1 fail
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.name = f"reward_model:{source}"

    def _text(self, q: str, r: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            # transformers types the result as str | ids | BatchEncoding; tokenize=False gives str
            return self.tokenizer.apply_chat_template(  # type: ignore[return-value]
                [{"role": "user", "content": q}, {"role": "assistant", "content": r}], tokenize=False)
        return f"{q}\n\n{r}"

    def __call__(self, instructions: Sequence[str], responses: Sequence[str], criteria: Sequence[str]) -> list[float]:
        texts = [self._text(q, r) for q, r in zip(instructions, responses, strict=True)]
        out: list[float] = []
        device = next(self.model.parameters()).device
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=True, add_special_tokens=not getattr(self.tokenizer, "chat_template", None))
            with torch.inference_mode():
                logits = self.model(**{k: v.to(device) for k, v in enc.items()}).logits
            out.extend(logits[:, 0].float().tolist())
        return out


class PairwiseJudge:
    """A chat model asked which of two responses is better, in both orders (a `Judge`).

    ``judge.compare(instructions, a, b)`` returns, per item, 1.0 if ``a`` wins in both orders, 0.0
    if ``b`` wins in both, 0.5 if the verdict flips with the order (position bias: a tie). The
    verdict is the comparison of the next-token logits of "A" and "B" after the question.

    Examples:
        >>> judge = PairwiseJudge(model)  # doctest: +SKIP
        >>> judge.compare(["Name a river."], ["The Nile."], ["Banana."])  # doctest: +SKIP
        [1.0]
    """

    name = "pairwise_judge"
    PROMPT = ("Which response answers the user's request better (more relevant, accurate, complete and clear)?\n\n"
              "Request: {q}\n\nResponse A: {a}\n\nResponse B: {b}\n\nAnswer with the single letter A or B.")

    def __init__(self, model: LoadedModel, *, batch_size: int = 8) -> None:
        self.model, self.batch_size = model, batch_size
        tok = model.tokenizer
        self._a = tok("A", add_special_tokens=False)["input_ids"][0]
        self._b = tok("B", add_special_tokens=False)["input_ids"][0]

    def _prefers_first(self, qs: Sequence[str], firsts: Sequence[str], seconds: Sequence[str]) -> list[bool]:
        tok = self.model.tokenizer
        texts = [render_chat(tok, self.PROMPT.format(q=q, a=a, b=b))
                 for q, a, b in zip(qs, firsts, seconds, strict=True)]
        logits = engine(self.model).next_token_logits(texts, batch_size=self.batch_size)
        return (logits[:, self._a] > logits[:, self._b]).tolist()

    def orders(self, instructions: Sequence[str], a: Sequence[str], b: Sequence[str]) -> tuple[list[bool], list[bool]]:
        """The raw verdicts: whether the judge picks the first response with ``a`` first, and with ``b`` first.

        A judge that always picks the same position, whatever the content, gives ``x == y`` everywhere.
        """
        return self._prefers_first(instructions, a, b), self._prefers_first(instructions, b, a)

    def compare(self, instructions: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        """1.0 / 0.0 / 0.5 per item: ``a`` better in both orders / ``b`` better / inconsistent."""
        return verdicts(*self.orders(instructions, a, b))

    def __call__(self, instructions: Sequence[str], responses: Sequence[str], criteria: Sequence[str]) -> list[float]:
        raise TypeError("PairwiseJudge compares two responses; use judge.compare(...) "
                        "or calibrate_gamma(scorer=judge).")
