"""Mind's Mirror's extraction rules: the answer and rationale of a chain of thought, the label of a self-evaluation.

Pure text functions (no model). The rules are the public code's (``data_utils.py`` of
Attention-is-All-I-Need/Mind-s-Mirror-Distilling-LLM, ``../shared/BASELINES.md`` section 3), SVAMP's rule for
numeric answers:

- **answer** (`extract_answer`): the text after "answer is" up to the period that ends the sentence, its part
  before any ``=`` (the paper writes "The answer is (10 * 45)." and keeps ``(10 * 45)``), only the characters
  ``0-9 + - * / . ( )`` and spaces kept, then evaluated as arithmetic. The paper evaluates with Python's
  ``eval``; here `evaluate_expression` walks the ``ast`` and allows only numbers, ``+ - * /``, unary signs and
  parentheses (exact, with fractions), so no text from a model is ever executed;
- **rationale** (`extract_rationale`): the text before the last "answer is", up to its last period;
- **self-evaluation label** (`extract_label`): "given answer is correct | wrong | uncertain";
- **evaluation rationale** (`evaluation_rationale`): every line of the evaluation but the last.

Where this differs from the paper's code, on purpose (each keeps every answer the paper's rule reads):

- the *last* "answer is" counts (the paper's ``re.search`` takes the first; a model that states a draft answer
  and then corrects it is read by its final answer), and the last label match counts (the paper checks
  uncertain, then wrong, then correct, anywhere in the text);
- a period between digits does not end the answer: the paper's non-greedy ``answer is (.*?)\\.`` reads
  "The answer is 2.5." as ``2``; here it is ``2.5``. The answer may also end at a line break or the end of the
  text (a small model often drops the final period);
- markdown emphasis around the answer (``**12**``) is removed, and when the part before ``=`` holds no digit
  ("the answer is x = 5.") the part after the last ``=`` is read;
- "the given answer is incorrect" is read as ``wrong`` (the paper's pattern skips it), and a label must be a
  whole word ("correctly" is not "correct").

Examples:
    >>> extract_answer("10 * 45 = 450 seeds. The answer is (10 * 45).")
    '450'
    >>> extract_rationale("So 10 * 45 = 450 seeds. The answer is (10 * 45).")
    'So 10 * 45 = 450 seeds.'
    >>> extract_label("Evaluation:\\n\\nAll steps hold.\\n\\nEvaluation result: the given answer is correct.")
    'correct'
"""

from __future__ import annotations

import ast
import math
import re
from fractions import Fraction
from typing import Literal

__all__ = ["Label", "LABELS", "extract_answer", "extract_rationale", "answers_match", "extract_label",
           "evaluation_rationale", "evaluate_expression", "normalize_number", "normalize_answer"]

#: A self-evaluation's verdict on a rationale (the paper's three labels).
Label = Literal["correct", "wrong", "uncertain"]
#: The labels, in the order the paper lists them.
LABELS: tuple[Label, ...] = ("correct", "wrong", "uncertain")

# The paper's SVAMP pattern is "answer is (.*?)\." (case-sensitive split, "the answer is" in its data).
_ANSWER_IS = re.compile(r"answer is", re.IGNORECASE)
# The answer runs to the first period not followed by a digit (a decimal point), a line break or the end.
_ANSWER_SPAN = re.compile(r"(.*?)(?:\.(?!\d)|\n|$)")
_KEEP = re.compile(r"[^0-9+\-*/.() ]")  # the paper's filter_string
_LABEL = re.compile(r"given answer is\s*['\"*]*(correct|wrong|uncertain|incorrect)\b", re.IGNORECASE)
#: Longest expression evaluated (a guard against pathological input; real answers are short).
_MAX_EXPRESSION = 200
#: Results beyond this magnitude are not answers (and keep fractions small).
_MAX_MAGNITUDE = 10**15


def evaluate_expression(text: str) -> Fraction | None:
    """The value of a simple arithmetic expression, exactly, or ``None`` when it is not one.

    Only numbers, ``+ - * /``, unary ``+``/``-`` and parentheses are allowed (walked on the ``ast``; nothing is
    executed). Division by zero, an empty text and anything else give ``None``.

    Examples:
        >>> evaluate_expression("(10 * 45)"), evaluate_expression("7 / 2"), evaluate_expression("2 ** 3")
        (Fraction(450, 1), Fraction(7, 2), None)
    """
    text = text.strip()
    if not text or len(text) > _MAX_EXPRESSION:
        return None
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    try:
        value = _value(tree.body)
    except (ZeroDivisionError, ValueError, OverflowError, RecursionError):
        return None
    if value is None or abs(value) > _MAX_MAGNITUDE:
        return None
    return value


def _value(node: ast.AST) -> Fraction | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        if isinstance(node.value, float) and not math.isfinite(node.value):
            return None
        return Fraction(repr(node.value)) if isinstance(node.value, float) else Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        inner = _value(node.operand)
        if inner is None:
            return None
        return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        left, right = _value(node.left), _value(node.right)
        if left is None or right is None:
            return None
        for v in (left, right):
            if abs(v) > _MAX_MAGNITUDE:
                return None
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        return left / right  # ZeroDivisionError -> None in evaluate_expression
    return None


def normalize_number(value: Fraction | int | float) -> str:
    """A number as the answer string the rows hold: an integer without a decimal point, else at most 6 decimals.

    Examples:
        >>> normalize_number(Fraction(12)), normalize_number(2.5), normalize_number(Fraction(1, 3))
        ('12', '2.5', '0.333333')
    """
    frac = Fraction(value) if not isinstance(value, float) else Fraction(repr(value))
    if frac.denominator == 1:
        return str(frac.numerator)
    text = f"{float(frac):.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def normalize_answer(text: str | float | None) -> str | None:
    """A gold answer (a number, a numeric string or an arithmetic expression) as a normalised number string.

    Thousands separators, currency signs and surrounding space are ignored; ``None`` when it is not a number.

    Examples:
        >>> normalize_answer("1,200"), normalize_answer("$5.50"), normalize_answer(" (3 + 4) "), normalize_answer("x")
        ('1200', '5.5', '7', None)
    """
    value = _number(text)
    return None if value is None else normalize_number(value)


def _number(text: str | float | None) -> Fraction | None:
    if text is None or isinstance(text, bool):
        return None
    if isinstance(text, int):
        return Fraction(text)
    if isinstance(text, float):
        return Fraction(repr(text)) if math.isfinite(text) else None
    return evaluate_expression(text.replace(",", "").replace("$", "").strip())


def _last_answer_is(text: str) -> re.Match[str] | None:
    matches = list(_ANSWER_IS.finditer(text))
    return matches[-1] if matches else None


def extract_answer(text: str) -> str | None:
    """The answer after the last "answer is", evaluated and normalised (``"12"``, ``"2.5"``), or ``None``.

    Examples:
        >>> extract_answer("The answer is 12."), extract_answer("the answer is (10 * 45).")
        ('12', '450')
        >>> extract_answer("The answer is $5.50."), extract_answer("No answer here.") is None
        ('5.5', True)
    """
    match = _last_answer_is(text)
    if match is None:
        return None
    span = _ANSWER_SPAN.match(text, match.end())
    raw = span.group(1) if span is not None else ""
    parts = raw.split("=")
    for part in (parts[0], parts[-1]):  # the paper keeps the part before '='; after it only if that has no digit
        kept = _KEEP.sub("", part).strip(" *")
        if any(c.isdigit() for c in kept):
            value = evaluate_expression(kept)
            return None if value is None else normalize_number(value)
    return None


def extract_rationale(text: str) -> str:
    """The text before the last "answer is", up to its last period (``""`` when there is none).

    Examples:
        >>> extract_rationale("Each box has 4. So 3 * 4 = 12. The answer is 12.")
        'Each box has 4. So 3 * 4 = 12.'
        >>> extract_rationale("The answer is 12."), extract_rationale("No answer.")
        ('', '')
    """
    match = _last_answer_is(text)
    if match is None:
        return ""
    before = text[:match.start()]
    return before[:before.rfind(".") + 1].strip()


def answers_match(pred: str | None, gold: str | None, *, tolerance: float = 1e-6) -> bool:
    """Whether two answers (numbers or arithmetic expressions as text) are the same number, within ``tolerance``.

    ``None`` or a text that is not a number never matches.

    Examples:
        >>> answers_match("12", "12.0"), answers_match("(10 * 45)", "450"), answers_match(None, "3")
        (True, True, False)
    """
    a, b = _number(pred), _number(gold)
    if a is None or b is None:
        return False
    return abs(float(a - b)) <= tolerance


def extract_label(text: str) -> Label | None:
    """The label of a self-evaluation: the last "given answer is correct | wrong | uncertain", or ``None``.

    "incorrect" counts as ``wrong``.

    Examples:
        >>> extract_label("Evaluation result: the given answer is wrong."), extract_label("Looks fine.") is None
        ('wrong', True)
    """
    matches = _LABEL.findall(text)
    if not matches:
        return None
    word = matches[-1].lower()
    if word == "incorrect":
        return "wrong"
    return "correct" if word == "correct" else "wrong" if word == "wrong" else "uncertain"


def evaluation_rationale(text: str) -> str:
    """The reasoning of a self-evaluation: every line but the last (the result line), stripped.

    Examples:
        >>> evaluation_rationale("Evaluation:\\n\\nThe sum is right.\\n\\nEvaluation result: ...")
        'Evaluation:\\n\\nThe sum is right.'
    """
    lines = text.strip().split("\n")
    return "\n".join(lines[:-1]).strip()
