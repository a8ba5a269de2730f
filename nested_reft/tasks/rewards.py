"""The value extractor v(.) and the verifiable math reward.

Training (the ReFT/GRPO reward) and evaluation (accuracy) both call :func:`math_reward`, so a bug here
silently biases both. The pipeline is::

    completion --extract_answer--> value --is_equivalent(value, gold)--> bool --> 1.0 / 0.0

Design points, each of which exists because model output is adversarial by accident:

* **Extraction is pure regex/str work on a bounded tail** (:data:`MAX_COMPLETION_CHARS`) with linear-time
  patterns, so a 1 MB rambling completion or 10,000 unbalanced ``{`` cost milliseconds.
* **Equivalence has a cheap fast path** (normalised string equality, exact/rounded number comparison)
  that settles the common GSM8K/MATH cases without sympy, then falls back to ``math_verify``
  (``parse`` + ``verify``) for LaTeX and expressions.
* **Every symbolic check runs under a deadline** (:data:`REWARD_TIMEOUT_S`), from any thread:
  ``math_verify``'s own timeout uses ``signal.alarm`` and raises when called off the main thread, so it is
  off and :func:`nested_reft.tasks.deadlines.run_with_deadline` bounds the check instead. A single long C call
  cannot be interrupted from another thread, so before any symbolic evaluation :func:`_too_big` bounds
  the number of digits that evaluating the parsed expressions could produce (exponent towers,
  ``10^9!``, ...) and rejects them outright.

* **Nothing raises out of** :func:`math_reward`: bad types, lone surrogates, parser crashes, recursion
  errors and timeouts all become 0.0 (logged at debug level).
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable
from fractions import Fraction
from typing import NamedTuple

import sympy
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from sympy.matrices import MatrixBase

from nested_reft.tasks.deadlines import DeadlineExceeded, run_with_deadline

logger = logging.getLogger(__name__)

REWARD_TIMEOUT_S: float = 3.0
"""Wall-clock budget for one symbolic check (math_verify parse of both sides + verify).

Legitimate answers take milliseconds (a few hundred ms for hairy ``simplify`` cases, more on a loaded
CPU), so 3 s leaves a wide margin while bounding what a pathological output can cost a training step.
"""

MAX_COMPLETION_CHARS = 16_000
"""Only the last this-many characters of a completion are searched: the final answer lives at the end,
and the cap keeps extraction cheap on runaway generations."""

MAX_ANSWER_CHARS = 500
"""Longer extracted answers are compared as strings only, never handed to the LaTeX/sympy parser (a
real final answer, even a matrix, is far shorter; long ones are runaway text)."""

MAX_RESULT_DIGITS = 100_000
"""Expressions whose evaluation could produce more decimal digits than this are rejected before sympy
evaluates them: such numbers are computed in C while holding the GIL, beyond any in-thread timeout."""

_LOG10_2 = math.log10(2)


# --------------------------------------------------------------------------------------------------
# Extraction: v(.)
# --------------------------------------------------------------------------------------------------

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_RE = re.compile(r"(?<!\\)[{}]")  # \{ and \} are literal set braces, not grouping
_HASHES = "####"
_ANSWER_RE = re.compile(r"answer\**\s*(?:is(?![\w'’])|:)", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"\.(?=\s|$)")
_NUMBER_RE = re.compile(
    r"(?:(?<![\w)\]}])[-−])?"  # a sign, unless it is a binary minus as in 10-5
    r"(?:\\[dt]?frac\{\d+\}\{\d+\}"  # \frac{1}{2}
    r"|\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)"  # 1,234,567.89
    r"|\d+(?:\.\d+)?(?:/\d+)?"  # 42, 3.14, 1/2
    r"|\.\d+)"  # .5
)


def _coerce_text(value: object) -> str | None:
    """Turn whatever the caller passed into a bounded, encodable str (or None for no text).

    Bytes are decoded leniently; ints/floats are stringified (a gold may come as a number); lone
    surrogates are dropped because some tokenizers' byte fallback produces them and they crash encoders.
    """
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value[-4 * MAX_COMPLETION_CHARS :]).decode("utf-8", errors="replace")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    value = value[-MAX_COMPLETION_CHARS:]
    return value.encode("utf-8", errors="ignore").decode("utf-8")


def _matching_braces(text: str) -> dict[int, int]:
    """Map each ``{`` index to its matching ``}`` in one linear pass (unmatched braces are skipped).

    A single stack pass, rather than scanning forward from every ``\\boxed{``, keeps adversarial inputs
    with thousands of unclosed boxes linear instead of quadratic.
    """
    stack: list[int] = []
    pairs: dict[int, int] = {}
    for match in _BRACE_RE.finditer(text):
        if match.group() == "{":
            stack.append(match.start())
        elif stack:
            pairs[stack.pop()] = match.start()
    return pairs


def _last_boxed(text: str) -> str | None:
    """Content of the last complete, non-empty ``\\boxed{...}``/``\\fbox{...}``, braces balanced.

    An unclosed last box (a truncated generation) is ignored and the previous complete one is used.
    """
    opens = [m.end() - 1 for m in _BOXED_RE.finditer(text)]
    if not opens:
        return None
    pairs = _matching_braces(text)
    for start in reversed(opens):
        end = pairs.get(start)
        if end is not None and text[start + 1 : end].strip():
            return text[start + 1 : end].strip()
    return None


def _first_sentence(rest: str) -> str | None:
    """The answer that follows a marker: its first non-empty line, cut at the end of the sentence.

    ``$`` signs are dropped: they are either math delimiters or currency, neither part of the value.
    """
    lines = rest.lstrip(" \t\r\n*:").splitlines()
    if not lines:
        return None
    line = _SENTENCE_END_RE.split(lines[0], maxsplit=1)[0]
    line = line.replace("\\$", "").replace("$", "").strip().strip("*").strip()
    return line.rstrip(".,;").strip() or None


def _after_hashes(text: str) -> str | None:
    """GSM8K style: the value after the last ``####``."""
    index = text.rfind(_HASHES)
    return None if index < 0 else _first_sentence(text[index + len(_HASHES) :])


def _after_answer_phrase(text: str) -> str | None:
    """The text after the last "the answer is" / "answer:" (case-insensitive), up to sentence end."""
    last = None
    for last in _ANSWER_RE.finditer(text):  # noqa: B007 - we want the last match
        pass
    return None if last is None else _first_sentence(text[last.end() :])


def _last_number(text: str) -> str | None:
    """The last number in the text: integer, decimal, negative, 1,234-style, a/b or ``\\frac{a}{b}``."""
    last = None
    for last in _NUMBER_RE.finditer(text):  # noqa: B007 - we want the last match
        pass
    return None if last is None else last.group().replace("−", "-")


_EXTRACTION_RULES: tuple[Callable[[str], str | None], ...] = (
    _last_boxed,
    _after_hashes,
    _after_answer_phrase,
    _last_number,
)


def extract_answer(completion: str) -> str | None:
    """The final value of a chain of thought (the paper's v(.)), or None when there is none.

    Rules, first hit wins: last ``\\boxed{}``/``\\fbox{}`` (balanced braces); value after the last
    ``####``; text after the last "the answer is"/"answer:"; the last number. Only the last
    :data:`MAX_COMPLETION_CHARS` characters are searched. Never raises.
    """
    try:
        text = _coerce_text(completion)
        if not text:
            return None
        for rule in _EXTRACTION_RULES:
            answer = rule(text)
            if answer:
                return answer
    except Exception:  # extraction is plain regex work; anything odd means "no answer", never a crash
        logger.debug("extract_answer failed", exc_info=True)
    return None


# --------------------------------------------------------------------------------------------------
# Equivalence: fast path
# --------------------------------------------------------------------------------------------------

_NORMALISE_SUBS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"\\[dt]frac", r"\\frac"),
        (r"\\(?:text|textbf|textrm|mathrm|mbox|operatorname)\s*\{([^{}]*)\}", r" \1"),
        (r"\\left(?![A-Za-z])|\\right(?![A-Za-z])|\\displaystyle", ""),
        (r"\^\s*\{?\s*\\circ\s*\}?|°", ""),  # degrees: 90^\circ == 90, as math_verify does
        (r"\{,\}", ","),  # 1{,}000
        (r"\\[!,;: ]|~", ""),  # LaTeX thin spaces (also used as thousands separators)
        (r"\\?\$|\\?%", ""),  # dollar signs and percent (a percent is re-checked symbolically)
        (r"\\[()\[\]]", ""),  # \( \) \[ \] math delimiters
        (r"[−–]", "-"),  # unicode minus / en dash
    )
)
_UNIT_SUFFIX_RE = re.compile(r"^([^\sA-Za-z]*\d)\s+[A-Za-z]{2,}[A-Za-z0-9/^.\s]*$")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
_SLASH_FRACTION_RE = re.compile(r"[+-]?\d+/\d+")
_LATEX_FRACTION_RE = re.compile(r"([+-]?)\\frac\{(\d+)\}\{(\d+)\}")
_INSIGNIFICANT_SPACE_RE = re.compile(r"(?<!\d) | (?!\d)")  # keep "1 2" != "12"
_SIGN_SPACE_RE = re.compile(r"^([+-])\s+")  # "- 5" is -5; other inner spaces make it not a number
_MAX_NUMBER_CHARS = 64


class _Number(NamedTuple):
    """A plain number read exactly, with the two facts that change how math_verify would compare it."""

    value: Fraction
    has_decimal: bool  # math_verify compares floats rounded to 6 places
    is_percent: bool  # math_verify lets 50% equal 0.5 as well as 50


def _normalise(answer: str) -> str:
    """Strip presentation (``$``, ``\\text{}``, ``\\left``, thin spaces, degrees, unicode minus)."""
    for pattern, replacement in _NORMALISE_SUBS:
        answer = pattern.sub(replacement, answer)
    answer = " ".join(answer.split())
    return answer.rstrip(".").strip()


def _as_number(raw: str, normalised: str) -> _Number | None:
    """Read a normalised answer as an exact number (units after a space dropped), else None."""
    unit_match = _UNIT_SUFFIX_RE.match(normalised)
    text = _SIGN_SPACE_RE.sub(r"\1", unit_match.group(1) if unit_match else normalised)
    if len(text) > _MAX_NUMBER_CHARS:
        return None
    try:
        if _THOUSANDS_RE.fullmatch(text):
            value = Fraction(text.replace(",", ""))
        elif _DECIMAL_RE.fullmatch(text) or _SLASH_FRACTION_RE.fullmatch(text):
            value = Fraction(text)
        elif latex := _LATEX_FRACTION_RE.fullmatch(text):
            value = Fraction(int(latex.group(2)), int(latex.group(3))) * (-1 if latex.group(1) == "-" else 1)
        else:
            return None
    except (ValueError, ZeroDivisionError):  # e.g. 1/0: not a number we can settle here
        return None
    return _Number(value, "." in text, "%" in raw)


def _compare_numbers(pred: _Number, gold: _Number) -> bool | None:
    """Settle a number-vs-number comparison the way math_verify would; None when it is a close call."""
    if pred.value == gold.value:
        return True
    if pred.is_percent or gold.is_percent:
        return None  # 50% vs 0.5: let math_verify apply its percent rules
    if not (pred.has_decimal or gold.has_decimal):
        return False  # exact rationals that differ
    if round(pred.value, 6) == round(gold.value, 6):
        return True
    return None if abs(pred.value - gold.value) < Fraction(1, 10**5) else False


def _fast_equivalence(pred: str, gold: str) -> bool | None:
    """True/False when cheap string/number checks settle it, None to defer to math_verify."""
    norm_pred, norm_gold = _normalise(pred), _normalise(gold)
    if not norm_pred or not norm_gold:
        return False
    if _INSIGNIFICANT_SPACE_RE.sub("", norm_pred) == _INSIGNIFICANT_SPACE_RE.sub("", norm_gold):
        return True
    pred_number, gold_number = _as_number(pred, norm_pred), _as_number(gold, norm_gold)
    if pred_number is not None and gold_number is not None:
        return _compare_numbers(pred_number, gold_number)
    return None


# --------------------------------------------------------------------------------------------------
# Equivalence: symbolic path (math_verify) and its guards
# --------------------------------------------------------------------------------------------------

# Both sides are wrapped in \boxed{} so math_verify's boxed rule (priority 0) takes the whole string;
# the plain-expression config is the fallback for text LaTeX cannot parse (e.g. "3*4").
_PARSE_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())

_FAST_GROWING = (
    sympy.factorial,
    sympy.factorial2,
    sympy.subfactorial,
    sympy.gamma,
    sympy.binomial,
    sympy.RisingFactorial,
    sympy.FallingFactorial,
    sympy.fibonacci,
    sympy.lucas,
    sympy.catalan,
    sympy.bell,
    sympy.Sum,
    sympy.Product,
)


def _digits_bound(expr: object) -> float:
    """Upper bound on log10|value| of evaluating ``expr``; raises OverflowError past the limit.

    Deliberately crude (symbols count as 1, sums of n terms add log10 n): it only has to tell a real
    answer (``2^{100}``, ``20!``) from an exponent tower or ``10^{9}!`` before sympy tries to evaluate it.
    """
    if isinstance(expr, sympy.Rational):
        bound = max(abs(expr.p).bit_length(), expr.q.bit_length()) * _LOG10_2
    elif isinstance(expr, sympy.Float):
        mpf = getattr(expr, "_mpf_", (0, 0, 0, 0))
        bound = abs(mpf[2] + mpf[3]) * _LOG10_2
    elif isinstance(expr, sympy.NumberSymbol):
        bound = 1.0
    elif isinstance(expr, (sympy.Pow, sympy.exp)):
        base, exponent = expr.as_base_exp()
        bound = _power_bound(_digits_bound(base), _digits_bound(exponent))
    else:
        children = list(expr) if isinstance(expr, MatrixBase) else getattr(expr, "args", ())
        bounds = [_digits_bound(child) for child in children if isinstance(child, (sympy.Basic, MatrixBase))]
        bound = _combine_bounds(expr, bounds)
    if bound > MAX_RESULT_DIGITS:
        raise OverflowError(f"evaluating the answer could produce ~10^{bound:.3g} digits")
    return bound


def _power_bound(base_digits: float, exponent_digits: float) -> float:
    """log10 bound of b**e given log10 bounds of |b| and |e| (|b| <= 1 never grows)."""
    if base_digits <= 0:
        return 0.0
    return math.inf if exponent_digits > 300 else base_digits * 10**exponent_digits


def _combine_bounds(expr: object, bounds: list[float]) -> float:
    """log10 bound of a node from its children's bounds."""
    if not bounds:
        return 0.0
    if isinstance(expr, sympy.Add):
        return max(bounds) + math.log10(len(bounds))
    if isinstance(expr, sympy.Mul):
        return sum(bounds)
    if isinstance(expr, _FAST_GROWING):  # n!, binomial, sums/products over n terms: about n*log10(n)
        largest = max(bounds)
        return math.inf if largest > 300 else (largest + 1) * 10**largest
    return max(bounds)


def _too_big(parsed: list) -> bool:
    """True when evaluating any parsed item could blow up (see :func:`_digits_bound`)."""
    try:
        for item in parsed:
            if isinstance(item, (sympy.Basic, MatrixBase)):
                _digits_bound(item)
    except (OverflowError, RecursionError):
        logger.debug("answer rejected as too big to evaluate", exc_info=True)
        return True
    return False


def _parse_answer(answer: str) -> list:
    """math_verify parse of one bare answer (gold or predicted): sympy object(s) plus a string fallback."""
    bare = answer.replace("\\$", "").replace("$", "")
    return parse("\\boxed{" + bare + "}", extraction_config=_PARSE_CONFIG, parsing_timeout=None)


def _verify_answers(pred: str, gold: str) -> bool:
    """The slow path: math_verify parse of both sides, size guard, then verify(gold, pred)."""
    gold_parsed, pred_parsed = _parse_answer(gold), _parse_answer(pred)
    if not gold_parsed or not pred_parsed or _too_big(gold_parsed + pred_parsed):
        return False
    # math_verify's own timeouts are off (None): they use signal.alarm, which raises off the main thread
    # and would cancel our timer; deadlines.run_with_deadline bounds the whole call instead.
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


class _DropTimeoutDisabledWarning(logging.Filter):
    """math_verify warns once that its timeout is off; that is deliberate here (we enforce our own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


@functools.cache
def _quiet_math_verify_timeout_warning() -> None:
    """Drop math_verify's warning that its timeout is off, once, on the first symbolic check: importing
    this module leaves the logging of other libraries as it found it."""
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def is_equivalent(predicted: str, gold: str, timeout_s: float | None = None) -> bool:
    """Whether the predicted answer equals the gold answer mathematically.

    Cheap normalised string/number checks first (``1,000`` == ``1000``, ``18.0`` == ``18``, ``$18`` ==
    ``18``, ``5 cm`` == ``5``), then math_verify for LaTeX, expressions, sets and intervals under a
    ``timeout_s`` deadline. Gold may hold several comma-separated answers (``"1, 2"``), compared as a
    set. Returns False (never raises) on unparsable input, oversized answers or a timeout.
    ``timeout_s=None`` means the module's :data:`REWARD_TIMEOUT_S`, read at call time.
    """
    timeout_s = REWARD_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        pred_text, gold_text = _coerce_text(predicted), _coerce_text(gold)
        if not pred_text or not gold_text:
            return False
        pred_text, gold_text = pred_text.strip(), gold_text.strip()
        if pred_text == gold_text:
            return True
        if len(pred_text) > MAX_ANSWER_CHARS or len(gold_text) > MAX_ANSWER_CHARS:
            return False
        fast = _fast_equivalence(pred_text, gold_text)
        if fast is not None:
            return fast
        _quiet_math_verify_timeout_warning()
        return run_with_deadline(lambda: _verify_answers(pred_text, gold_text), timeout_s)
    except DeadlineExceeded:
        logger.debug("equivalence check timed out after %.1fs", timeout_s)
    except Exception:  # parser/sympy internals can fail in many ways on junk; junk is simply not equal
        logger.debug("equivalence check failed", exc_info=True)
    return False


def math_reward(completion: str, gold: str, timeout_s: float | None = None) -> float:
    """The verifiable reward: 1.0 if the completion's final value equals ``gold``, else 0.0.

    Safe on any model output from any thread: never raises, and the symbolic check is bounded by
    ``timeout_s`` (default :data:`REWARD_TIMEOUT_S`; see the module docstring for how).
    """
    try:
        answer = extract_answer(completion)
        return 1.0 if answer is not None and is_equivalent(answer, gold, timeout_s) else 0.0
    except BaseException as error:  # a reward must not kill training; only real interrupts propagate
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        logger.debug("math_reward failed", exc_info=True)
        return 0.0
