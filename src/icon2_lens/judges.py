"""Pointwise scorers and pairwise judges: two protocols and their implementations.

A **scorer** (`Scorer`) scores each response on its own: ``scorer(instructions, responses,
criteria) -> list[float]``, higher is better; ``criteria[i]`` is the criterion response ``i`` was
steered along. A **judge** (`Judge`) compares two responses to the same instruction:
``judge.compare(instructions, a, b) -> list[float]``, 1.0 when ``a`` is better in both orders,
0.0 when ``b`` is, 0.5 when the verdict flips with the order (a tie), and ``judge.orders(...)``
gives the raw verdicts of the two orders. `is_pairwise` tells which one an object is;
`icon2_lens.calibrate_gamma`, `icon2_lens.evaluation.pair_report` and `icon2_lens.evaluate`
take either.

* `ProbeScorer` (the *self-probe*; offline, works on the embedded model): the model reads the response to
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
  seam (`icon2_lens.gen.engine`); `PairwiseJudge.load` loads a judge model other than the one
  being trained, through `icon2_lens.load_model`.
* `ChatEndpointJudge`: the same question to any OpenAI-compatible chat-completions server (a local
  ``llama_cpp.server``, vLLM, or ``icon2-lens serve``), the verdict parsed from the reply text.

`judge_summary` turns the raw verdicts of both orders into win/tie/loss, the share of verdicts that
picked the first shown response, and whether the judge is able to judge at all: a judge that picks
one position in more than `JUDGE_POSITION_LIMIT` of its verdicts (either position) reads the
position, not the answers, and is reported as unable to judge, not as a tie between methods.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeGuard, runtime_checkable

import torch

from .activations import LastTokenReader, tokenize_texts
from .directions import DirectionSet
from .errors import BadInputError
from .gen import engine
from .hardware import resolve_device
from .math.probe import probe_scores
from .math.text import parse_verdict
from .models import LoadedModel, load_model
from .prompts import render_chat

__all__ = ["Scorer", "Judge", "ProbeScorer", "RewardModelScorer", "PairwiseJudge", "ChatEndpointJudge",
           "JudgeEndpointError", "verdicts", "judge_summary", "JUDGE_POSITION_LIMIT", "is_pairwise", "make_judge",
           "check_judge", "check_reward_model"]

#: A judge that picks the same position (first, or second) in more than this share of its verdicts is
#: reported as unable to judge (`judge_summary`).
JUDGE_POSITION_LIMIT = 0.8


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


def judge_summary(ab: Sequence[bool], ba: Sequence[bool], *, unparsed: int = 0) -> dict[str, Any]:
    """Win/tie/loss of ``a`` against ``b`` from the raw verdicts of both orders, with the judge's position bias.

    ``ab[i]``: the judge picked the first shown response with ``a`` first; ``ba[i]``: with ``b`` first
    (what `Judge.orders` returns). A verdict that flips with the order is a tie. ``unparsed``: how many of
    the ``2 n`` replies named neither response (`ChatEndpointJudge.unparsed`; they are in ``ab``/``ba`` as
    "did not pick the first"), reported with the summary and in the note.

    Returns:
        ``{"n", "win", "tie", "loss", "first_position_share", "able_to_judge", "unparsed", "note"}``: ``win``/``tie``/
        ``loss`` are shares of the ``n`` items; ``first_position_share`` the share of the ``2 n`` verdicts
        that picked the response shown first (0.5: no position bias); ``able_to_judge`` is ``False`` when
        that share is above `JUDGE_POSITION_LIMIT` or below ``1 - JUDGE_POSITION_LIMIT`` (the judge reads
        the position, not the answers, so its ties say nothing about the methods), and ``note`` then says so;
        it also says how many replies were unparsed (``""`` when there is nothing to say).

    Examples:
        >>> s = judge_summary([True, True, False, True], [False, True, True, False])
        >>> s["win"], s["tie"], s["loss"], s["first_position_share"], s["able_to_judge"]
        (0.5, 0.25, 0.25, 0.625, True)
        >>> judge_summary([True] * 9 + [False], [True] * 10)["note"]
        'unable to judge: picks the first position in 95% of verdicts'
    """
    v = verdicts(ab, ba)
    n = len(v)
    if n == 0:
        raise ValueError("judge_summary needs at least one verdict pair; got none.")
    if not 0 <= unparsed <= 2 * n:
        raise ValueError(f"unparsed must be between 0 and the {2 * n} verdicts, got {unparsed}.")
    first = (sum(map(bool, ab)) + sum(map(bool, ba))) / (2 * n)
    able = 1 - JUDGE_POSITION_LIMIT <= first <= JUDGE_POSITION_LIMIT
    notes = []
    if not able:
        side, share = ("first", first) if first > 0.5 else ("second", 1 - first)
        notes.append(f"unable to judge: picks the {side} position in {share:.0%} of verdicts")
    if unparsed:
        notes.append(f"{unparsed} of {2 * n} replies named neither response (counted as not picking the first)")
    return {"n": n, "win": sum(x == 1.0 for x in v) / n, "tie": sum(x == 0.5 for x in v) / n,
            "loss": sum(x == 0.0 for x in v) / n, "first_position_share": first, "able_to_judge": able,
            "unparsed": unparsed, "note": "; ".join(notes)}


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
        ids = tokenize_texts(self.model, texts, fit_context=False)  # responses: as long as the model made them
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

    Batches are right-padded by this class, and each row is scored at its own last token, also when
    that token is the end-of-sequence token. (HF's classifier takes the rightmost token that is not
    ``config.pad_token_id``; with the common "pad = EOS" fallback a row ending in EOS would be read
    one token early, and without a pad id batches of more than one row are refused. So each batch
    pads with an id that ends no row of it, and the classifier's pad id, in this object's own copy
    of the model, is set to that id.) Batched scores equal one-by-one scores.

    Args:
        source: a local folder (or, with ``local_files_only=False``, an HF id) of a sequence-classification model.
        device: where to run it (default: CUDA when available, else CPU).
        batch_size: rows per forward pass.
        local_files_only: stay offline (default).
        trust_remote_code: let transformers run the Python code shipped in the model's folder/repo (some reward
            models define their own classes). It executes that code on this machine: only for repos you trust.

    Examples:
        >>> scorer = RewardModelScorer("path/to/reward-model")  # doctest: +SKIP
        >>> scorer(["Name a river."], ["The Nile."], ["helpful"])  # doctest: +SKIP
        [1.7]
    """

    name = "reward_model"

    def __init__(self, source: str | os.PathLike[str], *, device: str | None = None, batch_size: int = 8,
                 local_files_only: bool = True, trust_remote_code: bool = False) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        dev = resolve_device(device)
        check_reward_model(source, local_files_only=local_files_only)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=local_files_only,
                                                           trust_remote_code=trust_remote_code)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                str(source), local_files_only=local_files_only, trust_remote_code=trust_remote_code)
        except OSError as exc:
            raise FileNotFoundError(f"Cannot load a reward model from {source!r} ({exc}); pass a local folder of an HF "
                                    "sequence-classification model (or allow downloads).") from exc
        self.model.eval().to(dev)
        if self.tokenizer.pad_token is None and self.tokenizer.eos_token is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token  # our own copy of the tokenizer
        if self.model.config.get_text_config().pad_token_id is None:  # our own copy: set it, or batches > 1 fail
            self.model.config.get_text_config().pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.name = f"reward_model:{source}"

    def _text(self, q: str, r: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            # transformers types the result as str | ids | BatchEncoding; tokenize=False gives str
            return self.tokenizer.apply_chat_template(  # type: ignore[return-value]
                [{"role": "user", "content": q}, {"role": "assistant", "content": r}], tokenize=False)
        return f"{q}\n\n{r}"

    def _batch(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Right-padded ids and mask, padded with an id that ends no row (so HF pools each row's last token)."""
        rows = self.tokenizer(list(texts), truncation=True,
                              add_special_tokens=not getattr(self.tokenizer, "chat_template", None))["input_ids"]
        if any(len(r) == 0 for r in rows):
            raise ValueError("A reward-model input tokenises to nothing; pass non-empty instructions and responses.")
        last = {int(r[-1]) for r in rows}
        pid = self.tokenizer.pad_token_id
        if pid is None or pid in last:
            pid = next(i for i in range(len(last) + 1) if i not in last)
        ids = torch.full((len(rows), max(len(r) for r in rows)), pid, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        return ids, mask, pid

    def __call__(self, instructions: Sequence[str], responses: Sequence[str], criteria: Sequence[str]) -> list[float]:
        texts = [self._text(q, r) for q, r in zip(instructions, responses, strict=True)]
        out: list[float] = []
        device = next(self.model.parameters()).device
        config = self.model.config.get_text_config()
        for start in range(0, len(texts), self.batch_size):
            ids, mask, pid = self._batch(texts[start:start + self.batch_size])
            config.pad_token_id = pid  # this object's own copy of the model
            with torch.inference_mode():
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
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

    @classmethod
    def load(cls, source: str | os.PathLike[str] | None = None, *, device: str | torch.device | None = None,
             dtype: torch.dtype | None = None, batch_size: int = 8, local_files_only: bool = True,
             chat_template: str | None = None) -> PairwiseJudge:
        """A judge on a model of its own (e.g. a larger chat model than the one trained), via `icon2_lens.load_model`.

        Args:
            source: what `icon2_lens.load_model` takes (``None``: the embedded SmolLM2-135M-Instruct; an HF folder,
                a ``.gguf`` file or an HF id).
            device: ``"cpu"``, ``"cuda"``, ...; default: CUDA when available.
            dtype: weights dtype (default float32).
            batch_size: prompts per forward pass.
            local_files_only: stay offline (default).
            chat_template: a Jinja chat template for a tokenizer without one.

        Examples:
            >>> judge = PairwiseJudge.load("path/to/judge-model", dtype=torch.bfloat16)  # doctest: +SKIP
            >>> judge.compare(["Name a river."], ["The Nile."], ["Banana."])  # doctest: +SKIP
            [1.0]
        """
        model = load_model(source, device=device, dtype=dtype if dtype is not None else torch.float32,
                           local_files_only=local_files_only, chat_template=chat_template)
        return cls(model, batch_size=batch_size)

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


class JudgeEndpointError(OSError):
    """A chat-completions endpoint could not be reached, or answered with an error or with something unreadable."""


def _v1_url(url: str) -> str:
    base = url.strip().rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"The judge endpoint URL must start with http:// or https://, got {url!r}.")
    if base.endswith("/chat/completions"):
        base = base[: -len("/chat/completions")]
    return base if base.endswith("/v1") else base + "/v1"


class ChatEndpointJudge:
    """A pairwise judge behind any OpenAI-compatible chat-completions endpoint, asked in both orders (a `Judge`).

    Each (instruction, first, second) is sent as one user message with `PairwiseJudge.PROMPT`, at
    temperature 0 with a small ``max_tokens``, to ``{url}/chat/completions``, and the verdict is read
    from the reply with `icon2_lens.math.text.parse_verdict` ("A", "Response B", "**A**", ...). The
    typical endpoint is a local server: ``python -m llama_cpp.server --model FILE.gguf --port 8000``,
    vLLM's ``vllm serve``, or ``icon2-lens serve --model SRC --port 8000`` (any model `icon2_lens.load_model`
    takes). Only the standard library is used (``urllib``); requests run in ``max_workers`` threads and
    results keep their order.

    A reply that names neither letter (or both) counts as "did not pick the first response" and is
    counted in `unparsed` (out of `asked`); many unparsed replies pull the first-position share
    down, so pass the count on: ``judge_summary(ab, ba, unparsed=judge.unparsed)``.

    ``max_tokens`` is 16 by default: small chat models rarely answer with the bare letter. Measured on
    the embedded SmolLM2-135M-Instruct through ``icon2-lens serve`` (8 replies): 7 unparsed at
    ``max_tokens=1``, 6 at 4, 3 at 16 ("The answer is A.", "... the correct answer is indeed A: ...").

    Args:
        url: the server's base URL, with or without the trailing ``/v1`` (``http://127.0.0.1:8000`` and
            ``http://127.0.0.1:8000/v1`` are the same; ``/v1`` is appended when missing).
        model: the model name sent in each request (a single-model local server ignores it or checks it).
        api_key: sent as ``Authorization: Bearer ...`` when given.
        timeout: seconds to wait for each reply (a busy single-request server queues the others).
        max_workers: requests in flight at once.
        max_tokens: the reply's token budget (the verdict is one letter, often after a few words).

    Attributes:
        asked: replies received so far.
        unparsed: replies that named neither "A" nor "B" (or both), so far; set it to 0 to count afresh.

    Examples:
        >>> judge = ChatEndpointJudge("http://127.0.0.1:8000", "SmolLM2-135M-Instruct")  # doctest: +SKIP
        >>> judge.compare(["Name a river."], ["The Nile."], ["Banana."])  # doctest: +SKIP
        [1.0]
    """

    name = "chat_endpoint"

    def __init__(self, url: str, model: str, *, api_key: str | None = None, timeout: float = 60.0,
                 max_workers: int = 4, max_tokens: int = 16) -> None:
        if max_workers < 1 or max_tokens < 1 or not timeout > 0:
            raise ValueError(f"max_workers and max_tokens must be at least 1 and timeout above 0; got "
                             f"{max_workers}, {max_tokens}, {timeout}.")
        self.url, self.model, self.api_key = _v1_url(url), model, api_key
        self.timeout, self.max_workers, self.max_tokens = timeout, max_workers, max_tokens
        self.name = f"chat_endpoint:{model}"
        self.asked = 0
        self.unparsed = 0

    def _timeout_message(self, url: str) -> str:
        return f"The judge endpoint {url} did not answer within {self.timeout} s; raise timeout= or lower max_workers."

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.url}/{path}"
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            excerpt = exc.read()[:500].decode("utf-8", "replace")
            raise JudgeEndpointError(f"The judge endpoint {url} answered HTTP {exc.code} {exc.reason}: {excerpt}"
                                     ) from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ConnectionRefusedError):
                raise JudgeEndpointError(
                    f"Nothing is listening at {self.url} (connection refused). A chat-completions server must be "
                    "running there, e.g. `python -m llama_cpp.server --model FILE.gguf --port 8000` or "
                    "`icon2-lens serve --model SRC --port 8000`.") from exc
            if isinstance(exc.reason, TimeoutError):
                raise JudgeEndpointError(self._timeout_message(url)) from exc
            raise JudgeEndpointError(f"Cannot reach the judge endpoint {url}: {exc.reason}.") from exc
        except TimeoutError as exc:
            raise JudgeEndpointError(self._timeout_message(url)) from exc
        try:
            out = json.loads(body)
        except ValueError as exc:
            raise JudgeEndpointError(f"The judge endpoint {url} answered with something that is not JSON: "
                                     f"{body[:300]!r}") from exc
        if not isinstance(out, dict):
            raise JudgeEndpointError(f"The judge endpoint {url} answered {body[:300]!r}, not a JSON object.")
        return out

    def ask(self, prompt: str) -> str:
        """One user message to the endpoint; the reply's text.

        Examples:
            >>> judge.ask("Answer with the single letter A or B.")  # doctest: +SKIP
            'A'
        """
        out = self._post("chat/completions", {
            "model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": self.max_tokens, "stream": False})
        try:
            content = out["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise JudgeEndpointError(f"The judge endpoint {self.url} answered without choices[0].message.content: "
                                     f"{json.dumps(out)[:300]}") from exc
        return content if isinstance(content, str) else ""

    def _ask_all(self, prompts: Sequence[str]) -> list[str]:
        if len(prompts) <= 1 or self.max_workers == 1:
            return [self.ask(p) for p in prompts]
        pool = ThreadPoolExecutor(max_workers=min(self.max_workers, len(prompts)))
        try:
            replies = list(pool.map(self.ask, prompts))
        finally:  # on an error, drop the requests not started yet
            pool.shutdown(wait=True, cancel_futures=True)
        return replies

    def orders(self, instructions: Sequence[str], a: Sequence[str], b: Sequence[str]) -> tuple[list[bool], list[bool]]:
        """The raw verdicts: whether the judge picks the first response with ``a`` first, and with ``b`` first.

        Both orders are asked in one pool of requests; an unparseable reply is ``False`` (and counted).
        """
        if not len(instructions) == len(a) == len(b):
            raise ValueError(f"Got {len(instructions)} instructions, {len(a)} a and {len(b)} b; give one of each.")
        fmt = PairwiseJudge.PROMPT.format
        prompts = [fmt(q=q, a=x, b=y) for q, x, y in zip(instructions, a, b, strict=True)]
        prompts += [fmt(q=q, a=y, b=x) for q, x, y in zip(instructions, a, b, strict=True)]
        found = [parse_verdict(r) for r in self._ask_all(prompts)]
        self.asked += len(found)
        self.unparsed += sum(v is None for v in found)
        first = [v == "A" for v in found]
        n = len(instructions)
        return first[:n], first[n:]

    def compare(self, instructions: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        """1.0 / 0.0 / 0.5 per item: ``a`` better in both orders / ``b`` better / inconsistent (or unparsed)."""
        return verdicts(*self.orders(instructions, a, b))

    def __call__(self, instructions: Sequence[str], responses: Sequence[str], criteria: Sequence[str]) -> list[float]:
        raise TypeError("ChatEndpointJudge compares two responses; use judge.compare(...) "
                        "or calibrate_gamma(scorer=judge).")


def make_judge(spec: str, *, endpoint_model: str | None = None, device: str | None = None) -> Judge:
    """A judge from one string: an ``http(s)://`` URL is an OpenAI-compatible endpoint (`ChatEndpointJudge`,
    ``endpoint_model`` its model name, default ``"local"``), anything else a model source for
    `PairwiseJudge.load` (an HF folder or id, a ``.gguf`` file, ``"embedded"``).

    Examples:
        >>> make_judge("http://127.0.0.1:8080/v1", endpoint_model="smollm2").name  # doctest: +SKIP
        'endpoint:http://127.0.0.1:8080/v1/chat/completions:smollm2'
    """
    check_judge(spec)
    if spec.startswith(("http://", "https://")):
        return ChatEndpointJudge(spec, endpoint_model or "local")
    resolve_device(device)  # before the judge model loads
    return PairwiseJudge.load(None if spec == "embedded" else spec, device=device)


def _local_or_cached(source: str) -> bool:
    """Whether ``source`` is an existing file or folder, or an HF id whose ``config.json`` is in the local HF cache."""
    if Path(source).expanduser().exists():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(source, "config.json"), str)
    except Exception:  # not a valid repo id, no cache
        return False


def check_reward_model(source: str | os.PathLike[str], *, local_files_only: bool = True) -> None:
    """Refuse, before anything loads, a reward model `RewardModelScorer` cannot open offline: no such folder and
    no HF id in the local HF cache (``option="reward_model"``; the message lists the scorers that need none).

    Examples:
        >>> try:
        ...     check_reward_model("banana")
        ... except BadInputError as e:
        ...     print(e.option)
        reward_model
    """
    if local_files_only and not _local_or_cached(str(source)):
        raise BadInputError(
            f"reward model {str(source)!r} (CLI: --reward-model) is neither a local folder nor an HF id in the "
            "local HF cache; pass the folder of an HF sequence-classification model, allow downloads "
            "(local_files_only=False; CLI: --allow-download), or score without one (calibrate's --scorer: "
            "reward-probe, the default; self-probe; judge).", option="reward_model")


def check_judge(spec: str) -> None:
    """Refuse, before any model loads, a judge `make_judge` cannot open: not ``"embedded"``, not an ``http(s)://``
    URL, no such model folder or ``.gguf`` file, and no HF id in the local HF cache. The error
    (`icon2_lens.errors.BadInputError`, ``option="judge"``) lists what a judge can be.

    Examples:
        >>> check_judge("embedded"); check_judge("http://127.0.0.1:8000/v1")
        >>> try:
        ...     check_judge("banana")
        ... except BadInputError as e:
        ...     print(e.option)
        judge
    """
    if not isinstance(spec, str) or not spec.strip():
        raise BadInputError(f"judge must be a non-empty string, got {spec!r}.", option="judge")
    if spec.startswith(("http://", "https://")) or spec == "embedded" or _local_or_cached(spec):
        return
    raise BadInputError(
        f"judge {spec!r} (CLI: --judge) is not a judge this library can open: give 'embedded' (the embedded "
        "SmolLM2-135M-Instruct), a local model folder or .gguf file, an HF id already in the local HF cache, or the "
        "URL of an OpenAI-compatible chat endpoint (http://HOST:PORT/v1).", option="judge")
