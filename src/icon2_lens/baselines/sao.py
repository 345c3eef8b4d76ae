"""SAO pairs (Self-Alignment Optimization, arXiv 2510.06652): persona -> prompt, two samples, a pairwise self-judge.

SAO writes its own prompts. Each row takes a persona and asks the model for a prompt that persona might ask, with
Persona-Hub's ``instruction_template`` verbatim (`INSTRUCTION_TEMPLATE`; tencent-ailab/persona-hub,
``code/prompt_templates.py``, MIT code), in the chat template with the system prompt "You are a helpful
assistant." and sampled at temperature 0.6, top-p 0.95 (Persona-Hub's ``vllm_synthesize.py``); a leading
``User prompt:`` and surrounding quotes are cut off (`clean_user_prompt`). One prompt per persona. The model then
samples two responses to that prompt (same temperature and top-p) and ranks them with SAO's pairwise judge prompt
verbatim (`JUDGE_PROMPT`, from the paper's supplementary ``llm_as_a_judge_pairwise_prompt.txt``), greedily; the
verdict ``ranking: X > Y`` names the winner first (`parse_ranking`). The paper judges once, in a fixed order
(``both_orders=False``); ``both_orders=True`` also asks with the responses swapped and keeps only consistent
verdicts.

Personas: Persona-Hub's data is CC BY-NC-SA, so it is not shipped. ``persona_source="list"`` uses a hand-written
list of about a hundred one-line personas shipped with the package (``icon2_lens/data/personas.txt``, original
text under the package's licence) or one's own file (``personas=PATH``, one per line); the list is shuffled once
with the run's seed and row ``i`` takes persona ``i % len(personas)``. ``persona_source="model"`` has the model
write each persona first with a short prompt of ours (`PERSONA_PROMPT`): fully self-synthetic.

The input instructions only set how many rows to make and their ``criterion``; each row's ``instruction`` (and
``prompt``) is the generated prompt, and ``source_instruction`` records the input it stands for.

Drop reasons: ``"no persona"`` (a model-written persona came out empty), ``"no prompt"`` (the generated prompt is
empty once cleaned), ``"identical responses"`` (the two samples are the same text: no preference to judge),
``"unparsed"`` (a verdict is not ``ranking: X > Y`` with X and Y one of 1, 2, different), ``"inconsistent"``
(``both_orders``: the two orders disagree).

Costs: persona, prompt and responses are ``generation``; judging is ``labelling``.

Examples:
    >>> pairs = sao.make_pairs(model, ["Name a river."] * 8)  # doctest: +SKIP
    >>> pairs[0]["persona"], pairs[0]["instruction"]  # doctest: +SKIP
    ('A beekeeper in a rural valley ...', 'What can I do to keep my hives dry during a wet spring? ...')
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from ..gen import Generation, engine, row_seed
from ..models import LoadedModel
from ..prompts import render_chat
from ..runs.costs import CostMeter
from .common import (
    GENERATION,
    LABELLING,
    InstructionRow,
    Phase,
    ResponseBudget,
    dropped_row,
    instruction_rows,
    pair_row,
    run_method,
)

__all__ = ["SAOConfig", "make_pairs", "METHOD", "INSTRUCTION_TEMPLATE", "JUDGE_PROMPT", "PERSONA_PROMPT",
           "FORCED_PREFIX", "forced_verdicts",
           "SYSTEM_PROMPT", "load_personas", "clean_user_prompt", "parse_ranking", "judge_verdict"]

METHOD = "sao"

#: Persona-Hub's runner's system prompt for synthesis (code/vllm_synthesize.py).
SYSTEM_PROMPT = "You are a helpful assistant."

#: Persona-Hub's ``instruction_template``, verbatim (tencent-ailab/persona-hub:code/prompt_templates.py; SAO Fig. 1).
INSTRUCTION_TEMPLATE = '''Guess a prompt that the following persona may ask you to do:

{persona}

Note:

1. The prompt should be informative and specific.
2. Your output should start with "User prompt:"'''

#: SAO's pairwise self-judge prompt, verbatim (supplementary ``code/llm_as_a_judge_pairwise_prompt.txt``; the
#: space in ``</ Response 1>`` and the trailing space after "information" are the original's).
JUDGE_PROMPT = (
    "You are an impartial judge. Your task is to rank two answers to a given prompt based on their quality.\n"
    "\n"
    "Prompt: {prompt}\n"
    "\n"
    "Response 1: <Response 1> {response_1} </ Response 1>\n"
    "\n"
    "Response 2: <Response 2> {response_2} </ Response 2>\n"
    "\n"
    "Please carefully read each response and evaluate them based on the following criteria:\n"
    "1. Relevance and specificity to the prompt\n"
    "2. Accuracy and correctness of information \n"
    "3. Completeness and comprehensiveness\n"
    "4. Clarity and understandability\n"
    "\n"
    "Then, rank these two responses from best to worst.\n"
    "\n"
    "You must output your ranking strictly in the following format:\n"
    "ranking: X > Y\n"
    "\n"
    "Where X, Y each represent one of 1 or 2, without repetition.\n"
    "\n"
    "\n"
    "Remember, you must output a complete ranking including both options. Now, please provide your ranking:"
)

#: Our prompt for a model-written persona (``persona_source="model"``; SAO's personas come from Persona-Hub).
PERSONA_PROMPT = ("Describe one specific person who might ask an AI assistant for help, in a single sentence: who "
                  "they are, what they do and what they care about. Output only the description.")

_USER_PROMPT_LABEL = re.compile(r"^[\s*_#>]*user\s+prompt\s*[*_]*\s*:[\s*_]*", re.IGNORECASE)
_PERSONA_LABEL = re.compile(r"^[\s*_#>]*(?:persona|description)\s*[*_]*\s*:[\s*_]*", re.IGNORECASE)
_RANKING = re.compile(r"ranking\s*:\s*([12])\s*>\s*([12])", re.IGNORECASE)
#: An opening quote and the closing quotes that end it.
_QUOTES = {'"': '"\u201d', "\u201c": '\u201d"', "'": "'\u2019", "\u2018": "\u2019'"}


def _unquote(text: str) -> str:
    """``text`` without a surrounding pair of quotes; a quoted first line followed by comments keeps the quote."""
    t = text.strip()
    if not t or t[0] not in _QUOTES:
        return t
    closers = _QUOTES[t[0]]
    if len(t) > 1 and t[-1] in closers:
        return t[1:-1].strip()
    first = t.split("\n", 1)[0].rstrip()
    if len(first) > 1 and first[-1] in closers:
        return first[1:-1].strip()
    return t[1:].strip()


def clean_user_prompt(text: str) -> str:
    """The generated prompt without a leading ``User prompt:`` label, surrounding quotes or whitespace.

    Examples:
        >>> clean_user_prompt('User prompt: "Plan a three-day trip to Lisbon."')
        'Plan a three-day trip to Lisbon.'
        >>> clean_user_prompt('**User prompt:** How do I fix a leaking tap?'), clean_user_prompt("User prompt:")
        ('How do I fix a leaking tap?', '')
    """
    t = _unquote(text)
    m = _USER_PROMPT_LABEL.match(t)
    return _unquote(t[m.end():] if m else t)


def _clean_persona(text: str) -> str:
    """A model-written persona: its first non-empty line, without a ``Persona:`` label or quotes."""
    t = text.strip()
    m = _PERSONA_LABEL.match(t)
    t = _unquote(t[m.end():] if m else t)
    return next((line.strip() for line in t.splitlines() if line.strip()), "")


def parse_ranking(text: str) -> int | None:
    """The winner (1 or 2) of a ``ranking: X > Y`` verdict, or ``None`` (no such verdict, or X equals Y).

    Case-insensitive and tolerant of spaces; the first verdict in the text counts.

    Examples:
        >>> parse_ranking("Ranking: 2 > 1"), parse_ranking("ranking:1>2"), parse_ranking("ranking: 1 > 1")
        (2, 1, None)
    """
    m = _RANKING.search(text)
    if m is None or m.group(1) == m.group(2):
        return None
    return int(m.group(1))


#: The start of the judge's turn with ``judge_format="forced"``.
FORCED_PREFIX = "ranking:"


def forced_verdicts(eng: Any, texts: Sequence[str]) -> list[str]:
    """The verdict text (``"ranking: 1 > 2"`` or ``"ranking: 2 > 1"``) the model finds more likely after each text.

    Each text ends inside the judge's turn, right after `FORCED_PREFIX`; the two continuations are scored by their
    summed log-probabilities (ties go to response 1, as a free judge's first-listed answer would).

    Examples:
        >>> forced_verdicts(engine(model), [render_chat(tok, q, assistant=FORCED_PREFIX)])  # doctest: +SKIP
        ['ranking: 2 > 1']
    """
    if not texts:
        return []
    k = len(texts)
    lps = eng.continuation_logprobs([*texts, *texts], [" 1 > 2"] * k + [" 2 > 1"] * k)
    return [f"{FORCED_PREFIX} 1 > 2" if float(lps[j].sum()) >= float(lps[k + j].sum()) else f"{FORCED_PREFIX} 2 > 1"
            for j in range(k)]


def judge_verdict(outputs: Sequence[str]) -> tuple[int | None, str | None, dict[str, Any]]:
    """The winner in the original order from the judge's outputs, the drop reason, and the judge statistics.

    Args:
        outputs: the judge's raw output with response 1 shown first, then (``both_orders``) the output with the
            two responses swapped.

    Returns:
        ``(winner, reason, judge)``: ``winner`` 1 or 2 (``None`` when dropped), ``reason`` ``None``,
        ``"unparsed"`` or ``"inconsistent"``, and ``judge`` = ``{"comparisons", "parsed", "first_position"}``
        (``first_position``: parsed verdicts that picked the response shown first).

    Examples:
        >>> judge_verdict(["ranking: 2 > 1", "ranking: 1 > 2"])
        (2, None, {'comparisons': 2, 'parsed': 2, 'first_position': 1})
        >>> judge_verdict(["ranking: 1 > 2", "ranking: 1 > 2"])[1]
        'inconsistent'
    """
    if not 1 <= len(outputs) <= 2:
        raise ValueError(f"Expected one or two judge outputs, got {len(outputs)}.")
    picks = [parse_ranking(o) for o in outputs]
    parsed = [p for p in picks if p is not None]
    stats = {"comparisons": len(outputs), "parsed": len(parsed), "first_position": sum(p == 1 for p in parsed)}
    if len(parsed) < len(picks):
        return None, "unparsed", stats
    winners = {parsed[0], *(3 - p for p in parsed[1:])}  # a swapped verdict's "1" is response 2
    if len(winners) > 1:
        return None, "inconsistent", stats
    return parsed[0], None, stats


def load_personas(path: str | os.PathLike[str] | None = None) -> list[str]:
    """Personas, one per line (empty lines and ``#`` comments skipped, exact duplicates dropped).

    Args:
        path: a text file; ``None``: the list shipped with the package.

    Examples:
        >>> len(load_personas()) >= 100
        True
    """
    if path is None:
        text = resources.files("icon2_lens").joinpath("data").joinpath("personas.txt").read_text(encoding="utf-8")
        where = "the shipped personas.txt"
    else:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"Personas file {str(p)!r} does not exist; pass a text file with one persona "
                                    "per line, or personas=None for the shipped list.")
        text, where = p.read_text(encoding="utf-8"), str(p)
    lines = (line.strip() for line in text.splitlines())
    personas = list(dict.fromkeys(x for x in lines if x and not x.startswith("#")))
    if not personas:
        raise ValueError(f"{where} holds no personas; write one per line.")
    return personas


@dataclass(frozen=True, kw_only=True)
class SAOConfig(ResponseBudget):
    """Settings of SAO pairs (prompts and responses sampled at SAO's temperature 0.6, Persona-Hub's top-p 0.95).

    Attributes:
        personas: a text file of personas, one per line (``None``: the list shipped with the package).
        persona_source: ``"list"`` (``personas``) or ``"model"`` (the model writes each persona: self-synthetic).
        persona_tokens: token budget of a model-written persona.
        persona_temperature: sampling temperature of a model-written persona (high: varied personas).
        judge_tokens: token budget of a verdict (greedy).
        both_orders: also judge with the responses swapped and keep only consistent verdicts (the paper: one
            pass in a fixed order).
        judge_format: ``"free"``: the judge writes its verdict (the paper); ``"forced"``: the judge's turn starts
            with ``ranking:`` and the verdict is whichever of `` 1 > 2`` and `` 2 > 1`` the model finds more likely
            (the same prompt and format, read as log-probabilities; for models too small to follow the format:
            SmolLM2-135M never wrote a parseable ranking when free).

    Examples:
        >>> SAOConfig().temperature, SAOConfig().top_p
        (0.6, 0.95)
    """

    temperature: float = 0.6
    top_p: float = 0.95
    personas: str | None = None
    persona_source: Literal["list", "model"] = "list"
    persona_tokens: int = 64
    persona_temperature: float = 1.0
    judge_tokens: int = 16
    both_orders: bool = False
    judge_format: Literal["free", "forced"] = "free"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.judge_format not in ("free", "forced"):
            raise ValueError(f"judge_format must be 'free' or 'forced', got {self.judge_format!r}.")
        if self.persona_source not in ("list", "model"):
            raise ValueError(f"persona_source must be 'list' or 'model', got {self.persona_source!r}.")
        for name in ("persona_tokens", "judge_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
        self.decoding(do_sample=True, temperature=self.persona_temperature)  # validates it


@dataclass(frozen=True)
class _SourceRow(InstructionRow):
    """An input row with the persona it was assigned (``None``: the model writes one)."""

    persona: str | None = None


def make_pairs(
    model: LoadedModel,
    instructions: Any,
    config: SAOConfig | None = None,
    *,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    meter: CostMeter | None = None,
) -> list[dict[str, Any]]:
    """One SAO pair per input row: a persona's prompt, two samples, the self-judge's winner vs its loser.

    Args:
        model: from `icon2_lens.load_model`.
        instructions: what `icon2_lens.baselines.instruction_rows` reads; only their number and ``criterion``
            are used (SAO writes its own prompts).
        config: an `SAOConfig`.
        seed: the run's seed (the persona order and the per-batch seeds).
        out: a folder (``pairs.jsonl``, ``generation.json``, ``costs.json``); a rerun resumes.
        shard: ``(i, n)`` for data-parallel runs.
        progress: progress bar.
        meter: count costs into this meter (the pipeline's) instead of writing ``costs.json``.

    Returns:
        Rows in TRL's conversational format (see `icon2_lens.baselines.pair_row`; ``instruction`` is the generated
        prompt) plus ``persona``, ``source_instruction``, ``prompt_raw``, ``prompt_finished``, ``winner`` (1 or 2),
        ``judge_outputs`` and ``judge``; a row without a pair has ``kept`` false and a ``drop_reason``.
    """
    cfg = config or SAOConfig()
    sources = instruction_rows(instructions)
    settings: dict[str, Any] = {"system_prompt": SYSTEM_PROMPT, "instruction_template": INSTRUCTION_TEMPLATE,
                                "judge_prompt": JUDGE_PROMPT}
    if cfg.persona_source == "list":
        personas = load_personas(cfg.personas)
        settings["personas_sha256"] = hashlib.sha256(json.dumps(personas).encode()).hexdigest()
        random.Random(row_seed(seed, "personas")).shuffle(personas)
        rows = [_SourceRow(r.instruction, r.criterion, personas[i % len(personas)]) for i, r in enumerate(sources)]
    else:
        settings["persona_prompt"] = PERSONA_PROMPT
        rows = [_SourceRow(r.instruction, r.criterion) for r in sources]
    eng, tok = engine(model), model.tokenizer
    sampling = cfg.decoding(do_sample=True)
    persona_decoding = cfg.decoding(do_sample=True, max_new_tokens=cfg.persona_tokens,
                                    temperature=cfg.persona_temperature)
    judging = cfg.decoding(do_sample=False, max_new_tokens=cfg.judge_tokens)

    def generate(prompts: list[str], decoding: Any, seed: int) -> list[Generation]:
        return eng.generate(prompts, decoding, seed=seed) if prompts else []

    def make(batch: list[InstructionRow], s: int, phase: Phase) -> list[dict[str, Any]]:
        src = [r if isinstance(r, _SourceRow) else _SourceRow(r.instruction, r.criterion) for r in batch]
        with phase(GENERATION):
            if cfg.persona_source == "model":
                written = generate([render_chat(tok, PERSONA_PROMPT, system=SYSTEM_PROMPT)] * len(src),
                                   persona_decoding, row_seed(s, "persona"))
                personas = [_clean_persona(g.text) for g in written]
            else:
                personas = [str(r.persona) for r in src]
            has_persona = [i for i, p in enumerate(personas) if p]
            made = generate([render_chat(tok, INSTRUCTION_TEMPLATE.format(persona=personas[i]), system=SYSTEM_PROMPT)
                             for i in has_persona], sampling, row_seed(s, "prompt"))
            raw: dict[int, Generation] = dict(zip(has_persona, made, strict=True))
            prompts = {i: clean_user_prompt(g.text) for i, g in raw.items()}
            todo = [i for i in has_persona if prompts[i]]
            ys = generate([render_chat(tok, prompts[i]) for i in todo for _ in range(2)], sampling,
                          row_seed(s, "responses"))
        pair = {i: (ys[2 * j], ys[2 * j + 1]) for j, i in enumerate(todo)}
        judged = [i for i in todo if pair[i][0].text != pair[i][1].text]
        orders = [(0, 1), (1, 0)] if cfg.both_orders else [(0, 1)]
        questions = [JUDGE_PROMPT.format(prompt=prompts[i], response_1=pair[i][a].text, response_2=pair[i][b].text)
                     for i in judged for a, b in orders]
        with phase(LABELLING):
            if cfg.judge_format == "forced":
                texts = forced_verdicts(eng, [render_chat(tok, q, assistant=FORCED_PREFIX) for q in questions])
            else:
                texts = [g.text for g in generate([render_chat(tok, q) for q in questions], judging,
                                                  row_seed(s, "judge"))]
        outputs = {i: texts[j * len(orders):(j + 1) * len(orders)] for j, i in enumerate(judged)}
        rows_out = []
        for i, r in enumerate(src):
            prompt = prompts.get(i, "")
            row = InstructionRow(prompt, r.criterion)
            prov: dict[str, Any] = {
                "persona": personas[i], "source_instruction": r.instruction,
                "prompt_raw": raw[i].text if i in raw else None,
                "prompt_finished": raw[i].finished if i in raw else None, "winner": None,
                "judge_outputs": outputs.get(i, []),
                "judge": {"comparisons": 0, "parsed": 0, "first_position": 0}}
            if not personas[i]:
                rows_out.append(dropped_row(row, method=METHOD, reason="no persona", **prov))
            elif not prompt:
                rows_out.append(dropped_row(row, method=METHOD, reason="no prompt", **prov))
            elif i not in outputs:
                rows_out.append(dropped_row(row, method=METHOD, reason="identical responses", **prov))
            else:
                winner, reason, prov["judge"] = judge_verdict(outputs[i])
                if winner is None:
                    rows_out.append(dropped_row(row, method=METHOD, reason=str(reason), **prov))
                else:
                    prov["winner"] = winner
                    y = pair[i]
                    rows_out.append(pair_row(row, y[winner - 1], y[2 - winner], method=METHOD, **prov))
        return rows_out

    return run_method(method=METHOD, model=model, rows=list(rows), config=cfg, make=make, seed=seed, out=out,
                      shard=shard, progress=progress, meter=meter, settings=settings, key="source_instruction")
