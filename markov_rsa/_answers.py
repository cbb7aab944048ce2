"""Answers: pull the final answer out of a trace, normalise it, compare two answers, vote.

Math answers are compared in three steps, cheapest first: normalised strings, exact rational
values, then symbolic equivalence through math-verify (sympy), where a numeric fingerprint of each
expression settles most unequal pairs before sympy has to simplify anything. Code and general
answers are compared as normalised strings only.
"""

from __future__ import annotations

import cmath
import functools
import re
import textwrap
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

__all__ = ["TIE_RULES", "VoteResult", "answers_equivalent", "extract_answer", "normalize_answer", "vote"]

_TASKS = ("math", "code", "general")

# Answers longer than this skip the symbolic check: off the main thread math-verify runs without a
# timeout, and the cost of sympy grows quickly with the size of the expression.
_SYMBOLIC_MAX_CHARS = 200
# Seconds math-verify may spend on one parse or one comparison when it can use its own alarm.
_SYMBOLIC_TIMEOUT_S = 1
# Powers, factorials and binomials beyond these sizes make sympy build integers with millions of
# digits, which no timeout interrupts reliably. A power's size is estimated as its exponent times
# the digits of its base.
_MAX_POWER_DIGITS = 10**6
_UNKNOWN_BASE_DIGITS = 32
_MAX_FACTORIAL_DIGITS = 4
# Digits used for numeric fingerprints. Two fingerprints further apart than the absolute gap (or
# the relative one, for large values) cannot be equal under math-verify: its float rule accepts
# values that agree to 6 decimals, i.e. closer than 1e-6, and its other rules demand exact equality.
_FINGERPRINT_DIGITS = 30
_FINGERPRINT_ABSOLUTE_GAP = 2e-6
_FINGERPRINT_RELATIVE_GAP = 1e-9

# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_FINAL_ANSWER = re.compile(r"final\s+answer[\s*_]*[:：]", re.IGNORECASE)
_FENCE_OPEN = re.compile(r"^[ \t]*(`{3,}|~{3,})[^\n]*\n", re.MULTILINE)


def _balanced(text: str, start: int, open_char: str = "{", close_char: str = "}") -> int | None:
    """Index just past the group opened at ``text[start]``, or None if it never closes.

    Backslash escapes are skipped so that ``\\{`` and ``\\}`` (set braces) do not count.
    """
    depth = 0
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == open_char:
            depth += 1
        elif char == close_char:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _boxes(text: str) -> list[str]:
    """Contents of every complete, non-empty top-level ``\\boxed``/``\\fbox`` in order."""
    found: list[str] = []
    pos = 0
    while (match := _BOX.search(text, pos)) is not None:
        i = match.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            end = _balanced(text, i)
            if end is None:
                # An unclosed box (a trace cut off mid-answer) holds no answer; keep looking.
                pos = match.end()
                continue
            content = _box_value(text[i + 1 : end - 1])
            pos = end
        else:
            # ``\boxed 42``: TeX would take one token, but writers mean the whole word.
            end = i
            while end < len(text) and not text[end].isspace() and text[end] != "$":
                end += 1
            content = text[i:end].strip()
            pos = max(end, match.end())
        if content:
            found.append(content)
    return found


_ARITHMETIC_COMMANDS = re.compile(
    r"\\(?:[dt]?frac|sqrt|cdot|times|div|pi|left|right|[,;:! ])(?![A-Za-z])"
)


def _top_level_equals(text: str) -> list[int]:
    """Positions of the ``=`` signs outside braces that are not part of ``==``, ``<=``, ``>=``, ``!=``, ``:=``."""
    found = []
    depth = 0
    for i, char in enumerate(text):
        if char in "{([":
            depth += 1
        elif char in "})]":
            depth -= 1
        elif char == "=" and depth == 0:
            before = text[i - 1] if i else ""
            after = text[i + 1] if i + 1 < len(text) else ""
            if before not in "<>!:=" and after != "=":
                found.append(i)
    return found


def _is_arithmetic(text: str) -> bool:
    """Numbers and operators only: no variable, no unknown command."""
    rest = _ARITHMETIC_COMMANDS.sub(" ", text)
    return bool(text.strip()) and re.search(r"[A-Za-z\\]", rest) is None and re.search(r"\d", rest) is not None


def _box_value(content: str) -> str:
    """The answer a box holds: the innermost of nested boxes (``\\boxed{\\boxed{3820}}``), and of a
    chain of equalities between plain numbers (``160 + 80 + 20 = 360``) its right-hand side."""
    content = content.strip()
    while (match := _BOX.match(content)) is not None:
        brace = match.end()
        if brace < len(content) and content[brace] == "{" and _balanced(content, brace) == len(content):
            content = content[brace + 1 : -1].strip()
        else:
            break
    cuts = _top_level_equals(content)
    if cuts:
        sides = [content[a + 1 : b].strip() for a, b in zip([-1, *cuts], [*cuts, len(content)])]
        if all(_is_arithmetic(side) for side in sides):
            return sides[-1]
    return content


def _last_box(text: str) -> str | None:
    boxes = _boxes(text)
    return boxes[-1] if boxes else None


def _last_code_block(text: str) -> str | None:
    body: str | None = None
    pos = 0
    while (match := _FENCE_OPEN.search(text, pos)) is not None:
        fence = match.group(1)
        closing = re.compile(rf"^[ \t]*{re.escape(fence)}[ \t]*$", re.MULTILINE)
        close = closing.search(text, match.end())
        if close is None:
            # A fence that never closes is a truncated block; earlier complete blocks still count.
            break
        candidate = _normalize_code(textwrap.dedent(text[match.end() : close.start()]))
        if candidate:
            body = candidate
        pos = close.end()
    return body


def _strip_emphasis(text: str) -> str:
    return text.strip().strip("*_").strip()


def _final_answer_line(text: str) -> str | None:
    matches = list(_FINAL_ANSWER.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :]
    lines = rest.split("\n")
    line = _strip_emphasis(lines[0])
    if not line:
        # "Final answer:" on a line of its own, the answer on the next one.
        line = next((_strip_emphasis(extra) for extra in lines[1:] if _strip_emphasis(extra)), "")
    if not line:
        return None
    bare = line.strip("$ ").rstrip(".").strip("$ ")
    match = _BOX.match(bare)
    if match is not None:
        brace = match.end()
        if brace < len(bare) and bare[brace] == "{" and _balanced(bare, brace) == len(bare):
            return bare[brace + 1 : -1].strip() or None
    return line


def extract_answer(text: str, task: str = "math") -> str | None:
    """The final answer a trace gives, or None when it gives none.

    - ``math``: the content of the last complete ``\\boxed{...}`` (braces balanced, so nested
      ``\\frac{1}{2}`` survives), also ``\\fbox{...}`` and the brace-less ``\\boxed 5``. A box
      inside a box is one answer (``\\boxed{\\boxed{3820}}`` gives ``3820``); a chain of
      equalities between plain numbers gives its right-hand side (``\\boxed{160 + 80 + 20 = 360}``
      gives ``360``), while an equation with unknowns stays whole.
    - ``code``: the body of the last complete fenced code block, dedented and stripped.
    - ``general``: the rest of the line after the last ``Final answer:`` (any case; the next line
      when that one is empty), else the last ``\\boxed{...}``.
    """
    _check_task(task)
    if not text:
        return None
    if task == "math":
        return _last_box(text)
    if task == "code":
        return _last_code_block(text)
    return _final_answer_line(text) or _last_box(text)


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------

_DELIMITERS = re.compile(r"\\[()\[\]]")
_SIZED_DELIMITER_DOT = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)\.")
_SIZING = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big|displaystyle|textstyle)(?![A-Za-z])")
_SPACING = re.compile(r"\\(?:[!,;:> ]|quad(?![A-Za-z])|qquad(?![A-Za-z]))|~")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ(?![A-Za-z])|\\degree(?![A-Za-z])|°")
_FRAC_VARIANT = re.compile(r"\\[dt]frac(?![A-Za-z])")
_TEXT_COMMAND = r"\\(?:text|textrm|textbf|textit|textnormal|mbox|mathrm|mathbf|mathit)"
_TRAILING_UNIT = re.compile(
    _TEXT_COMMAND + r"\s*\{\s*[A-Za-z][A-Za-z .]*\}(?:\^\s*\{?\d\}?)?\s*$"
)
_TEXT_WRAPPER = re.compile(_TEXT_COMMAND + r"\s*\{")
_SPACE_OR_WORD_GAP = re.compile(r"\\[A-Za-z]+ (?=[A-Za-z])|\s+")
_FRAC_DIGITS = re.compile(r"\\frac(\d)(\d)")
_FRAC_DIGIT_FIRST = re.compile(r"\\frac(\d)(?=\{)")
_FRAC_DIGIT_SECOND = re.compile(r"\\frac(\{[^{}]*\})(\d)")
_SQRT_DIGIT = re.compile(r"\\sqrt(\d)")
_LE_GE = re.compile(r"\\(le|ge)(?![A-Za-z])")
_ASSIGNMENT = re.compile(r"^(?:[A-Za-z]|\\[A-Za-z]+)(?:_(?:\{[^{}]*\}|[A-Za-z0-9]))?=(?!=)")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_PADDED_NUMBER = re.compile(r"([+-]?)0+(\d+(?:\.\d*)?)")
_CHOICE = re.compile(r"\(([A-Za-z])\)")


def _unwrap_text(text: str) -> str:
    """Replace ``\\text{X}`` (and its relatives) by ``X``, braces balanced."""
    out: list[str] = []
    pos = 0
    while (match := _TEXT_WRAPPER.search(text, pos)) is not None:
        brace = match.end() - 1
        end = _balanced(text, brace)
        if end is None:
            break
        out.append(text[pos : match.start()])
        out.append(text[brace + 1 : end - 1])
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _strip_outer(text: str) -> str:
    """Drop wrappers that enclose the whole answer: a box or a brace group, repeatedly."""
    while True:
        text = text.strip()
        match = _BOX.match(text)
        if match is not None:
            brace = match.end()
            if brace < len(text) and text[brace] == "{" and _balanced(text, brace) == len(text):
                text = text[brace + 1 : -1]
                continue
        if text.startswith("{") and _balanced(text, 0) == len(text):
            text = text[1:-1]
            continue
        return text


def _normalize_math(answer: str) -> str:
    text = _strip_outer(answer)
    # The escaped dollar is currency and must go before bare dollars (math delimiters) do.
    text = text.replace("\\$", "").replace("$", "")
    text = _DELIMITERS.sub("", text)
    text = _strip_outer(text)
    text = _FRAC_VARIANT.sub(r"\\frac", text)
    text = _SIZED_DELIMITER_DOT.sub("", text)
    text = _SIZING.sub("", text)
    text = _SPACING.sub(" ", text).replace("{,}", ",")
    text = _DEGREES.sub("", text)
    prefix = _TRAILING_UNIT.sub("", text).strip()
    if prefix != text.strip() and any(char.isdigit() for char in prefix):
        # A unit after a quantity ("5\text{ cm}") is not part of the value.
        text = prefix
    text = _unwrap_text(text)
    # Spaces carry no meaning in LaTeX except to end a control word before a letter ("\pi r").
    text = _SPACE_OR_WORD_GAP.sub(lambda m: m.group(0) if m.group(0).startswith("\\") else "", text.strip())
    text = _FRAC_DIGITS.sub(r"\\frac{\1}{\2}", text)
    text = _FRAC_DIGIT_FIRST.sub(r"\\frac{\1}", text)
    text = _FRAC_DIGIT_SECOND.sub(r"\\frac\1{\2}", text)
    text = _SQRT_DIGIT.sub(r"\\sqrt{\1}", text)
    text = _LE_GE.sub(r"\\\1q", text)
    text = text.replace("\\%", "%")
    while text.endswith((".", "%")):
        text = text[:-1]
    assignment = _ASSIGNMENT.match(text)
    if assignment is not None and "=" not in text[assignment.end() :] and text[assignment.end() :]:
        text = text[assignment.end() :]
    text = _strip_outer(text)
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    padded = _PADDED_NUMBER.fullmatch(text)
    if padded is not None:
        sign, digits = padded.groups()
        text = f"{sign}{digits}"
    if text.startswith("+") and _is_number(text[1:]):
        text = text[1:]
    if text in ("-0", "-0.0"):
        text = text[1:]
    choice = _CHOICE.fullmatch(text)
    if choice is not None:
        text = choice.group(1)
    return text


def _normalize_code(answer: str) -> str:
    lines = [line.rstrip() for line in answer.replace("\r\n", "\n").split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def _normalize_general(answer: str) -> str:
    text = " ".join(answer.casefold().split())
    previous = None
    while previous != text:
        previous = text
        text = text.strip().strip("*_`\"'").rstrip(".,;:!?。").strip()
    return text


def normalize_answer(answer: str, task: str = "math") -> str:
    """A canonical spelling of an answer, for string comparison.

    - ``math``: drops math delimiters (``$``, ``\\(``, ``\\)``), ``\\left``/``\\right``, thin spaces,
      spaces, degree signs, percent signs, a trailing period and unit ``\\text{...}`` after a number;
      unwraps other ``\\text{...}``; ``\\dfrac``/``\\tfrac`` become ``\\frac`` with braced arguments;
      ``042`` becomes ``42``, ``1,000`` becomes ``1000``, ``x = 5`` becomes ``5``.
    - ``code``: trailing whitespace of each line and blank lines at either end removed.
    - ``general``: case-folded, whitespace collapsed, surrounding emphasis, quotes and trailing
      punctuation removed.
    """
    _check_task(task)
    if task == "math":
        return _normalize_math(answer)
    if task == "code":
        return _normalize_code(answer)
    return _normalize_general(answer)


# ---------------------------------------------------------------------------------------------
# Equivalence
# ---------------------------------------------------------------------------------------------

_INTEGER = re.compile(r"[+-]?\d+")
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)"
_FRACTION = re.compile(rf"([+-]?)\\frac\{{({_NUMBER})\}}\{{({_NUMBER})\}}")
_SLASH = re.compile(rf"({_NUMBER})/({_NUMBER})")
_CONTROL_WORD = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(r"[A-Za-z]{3,}")
_DIGITS = re.compile(r"\d+")


def _is_number(text: str) -> bool:
    return _DECIMAL.fullmatch(text) is not None


def _as_rational(text: str) -> Fraction | None:
    """The exact value of a plain number, decimal or numeric fraction; None for anything else."""
    try:
        if _DECIMAL.fullmatch(text):
            return Fraction(text)
        if (match := _FRACTION.fullmatch(text)) is not None:
            sign, numerator, denominator = match.groups()
            value = Fraction(numerator) / Fraction(denominator)
            return -value if sign == "-" else value
        if (match := _SLASH.fullmatch(text)) is not None:
            return Fraction(match.group(1)) / Fraction(match.group(2))
    except (ZeroDivisionError, ValueError):
        return None
    return None


def _exponent_operand(text: str, caret: int) -> str:
    i = caret + 1
    if i >= len(text):
        return ""
    closers = {"{": "}", "(": ")"}
    if text[i] in closers:
        end = _balanced(text, i, text[i], closers[text[i]])
        return text[i + 1 : (end - 1) if end is not None else len(text)]
    if text[i].isdigit():
        end = i
        while end < len(text) and text[end].isdigit():
            end += 1
        return text[i:end]
    return text[i]


def _base_digits(text: str, caret: int) -> int | None:
    """Digits of the integer literal right before ``^``; None when the base is not one."""
    start = caret
    while start > 0 and text[start - 1].isdigit():
        start -= 1
    return caret - start if start < caret else None


def _symbolic_allowed(text: str) -> bool:
    """Whether handing this answer to sympy is both meaningful and sure to finish quickly."""
    if len(text) > _SYMBOLIC_MAX_CHARS:
        return False
    # Plain words become products of symbols in sympy ("yes" == "sey"); they compare as strings.
    if _WORD.search(_CONTROL_WORD.sub(" ", text)):
        return False
    # sympy evaluates factorials and binomials of integers eagerly, so their size must be visible
    # and small: a short literal before each "!" and no large numbers inside a binomial.
    for bang in (i for i, char in enumerate(text) if char == "!"):
        digits = _base_digits(text, bang)
        if digits is None or digits > _MAX_FACTORIAL_DIGITS:
            return False
    if ("\\binom" in text or "\\choose" in text) and (
        "^" in text or any(len(run) > _MAX_FACTORIAL_DIGITS for run in _DIGITS.findall(text))
    ):
        return False
    for caret in (i for i, char in enumerate(text) if char == "^"):
        operand = _exponent_operand(text, caret)
        # Towers (2^{2^{100}}) and factorial exponents evaluate to integers too large to build.
        if "^" in operand or "!" in operand:
            return False
        exponent = 1
        for run in _DIGITS.findall(operand):
            exponent *= int(run)
            if exponent > _MAX_POWER_DIGITS:
                return False
        # An unknown base ("(2^{100})^{k}", "\pi^{k}") is assumed to be a few dozen digits long.
        if exponent * (_base_digits(text, caret) or _UNKNOWN_BASE_DIGITS) > _MAX_POWER_DIGITS:
            return False
    return True


@functools.cache
def _math_verify() -> _Tools | None:
    """math-verify's ``parse`` and ``verify`` and the sympy types needed around them.

    Imported on first use: the import pulls in sympy and the LaTeX grammar (about half a second),
    which callers that only extract or compare strings should not pay.
    """
    try:
        import sympy
        from math_verify import parse, verify
        from math_verify.errors import TimeoutException
    except ImportError:
        return None
    return _Tools(parse, verify, TimeoutException, sympy.Expr, sympy.Symbol)


@dataclass(frozen=True)
class _Tools:
    parse: Callable[..., list[Any]]
    verify: Callable[..., bool]
    timeout_error: type[BaseException]
    expr_type: type[Any]
    symbol_type: type[Any]


@dataclass(frozen=True)
class _Parsed:
    """One answer as math-verify sees it, plus a numeric fingerprint of each sympy object."""

    objects: list[Any]
    texts: frozenset[str]
    values: list[complex | None]


def _point(name: str) -> float:
    # A fixed, name-dependent point away from the small integers where unequal polynomials often agree.
    return 0.5 + (zlib.crc32(name.encode()) % 9973) / 9973 * 1.5 + 1 / 7


def _fingerprint(obj: Any, tools: _Tools) -> complex | None:
    """The value of a plain expression at a fixed point, or None where a value says nothing.

    Relations, sets, tuples, matrices and lone symbols have comparison rules of their own in
    math-verify, so only ordinary expressions get a fingerprint.
    """
    if not isinstance(obj, tools.expr_type) or isinstance(obj, tools.symbol_type):
        return None
    try:
        point = {symbol: _point(str(symbol)) for symbol in obj.free_symbols}
        value = obj.evalf(_FINGERPRINT_DIGITS, subs=point) if point else obj.evalf(_FINGERPRINT_DIGITS)
        if not value.is_number:
            return None
        result = complex(value)
    except Exception:  # noqa: BLE001 - an expression without a value simply has no fingerprint
        return None
    if cmath.isnan(result) or cmath.isinf(result):
        return None
    return result


def _clearly_different(a: complex | None, b: complex | None) -> bool:
    """Whether two fingerprints rule out equality under every rule math-verify applies."""
    if a is None or b is None:
        return False
    gap = max(_FINGERPRINT_ABSOLUTE_GAP, _FINGERPRINT_RELATIVE_GAP * max(abs(a), abs(b)))
    return abs(a - b) > gap


class _MathJudge:
    """Decides math equivalence for one call, caching parses and verdicts by normalised answer."""

    def __init__(self) -> None:
        self._parsed: dict[str, _Parsed | None] = {}
        self._verdicts: dict[tuple[str, str], bool] = {}
        # math-verify's timeouts use SIGALRM, which can only be armed from the main thread.
        self._timeout: int | None = (
            _SYMBOLIC_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
        )

    def same(self, a: str, b: str) -> bool:
        """Whether two normalised math answers denote the same value."""
        if a == b:
            return True
        if not a or not b:
            return False
        key = (a, b) if a < b else (b, a)
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = self._decide(a, b)
            self._verdicts[key] = verdict
        return verdict

    def _decide(self, a: str, b: str) -> bool:
        ra, rb = _as_rational(a), _as_rational(b)
        if ra is not None and rb is not None:
            if ra == rb:
                return True
            # Distinct integers are never equal; decimals still get math-verify's rounding rules.
            if _INTEGER.fullmatch(a) and _INTEGER.fullmatch(b):
                return False
        return self._symbolic(a, b)

    def _parse(self, text: str, tools: _Tools) -> _Parsed | None:
        if text in self._parsed:
            return self._parsed[text]
        parsed: _Parsed | None = None
        if _symbolic_allowed(text):
            try:
                # math-verify only finds LaTeX inside math delimiters; a bare "\frac12" parses to nothing.
                result = tools.parse(f"${text}$", parsing_timeout=self._timeout)
            except (Exception, tools.timeout_error):  # noqa: BLE001 - unparsable means not comparable
                result = []
            objects = [item for item in result if not isinstance(item, str)]
            texts = frozenset(item.strip() for item in result if isinstance(item, str))
            if objects:
                parsed = _Parsed(objects, texts - {""}, [_fingerprint(obj, tools) for obj in objects])
        self._parsed[text] = parsed
        return parsed

    def _symbolic(self, a: str, b: str) -> bool:
        tools = _math_verify()
        if tools is None:
            return False
        parsed_a = self._parse(a, tools)
        if parsed_a is None:
            return False
        parsed_b = self._parse(b, tools)
        if parsed_b is None:
            return False
        # math-verify counts equal extracted strings as a match before any sympy work.
        if parsed_a.texts & parsed_b.texts:
            return True
        for obj_a, value_a in zip(parsed_a.objects, parsed_a.values):
            for obj_b, value_b in zip(parsed_b.objects, parsed_b.values):
                # Most pairs in a vote differ; a numeric fingerprint settles them without simplify().
                if _clearly_different(value_a, value_b):
                    continue
                if self._verify(obj_a, obj_b, tools):
                    return True
        return False

    def _verify(self, a: Any, b: Any, tools: _Tools) -> bool:
        try:
            # verify() is not symmetric (gold vs prediction); a vote has no gold, so either way counts.
            return bool(
                tools.verify(a, b, timeout_seconds=self._timeout)
                or tools.verify(b, a, timeout_seconds=self._timeout)
            )
        except (Exception, tools.timeout_error):  # noqa: BLE001 - a failed comparison is not a match
            return False


def answers_equivalent(a: str, b: str, task: str = "math") -> bool:
    """Whether two extracted answers are the same answer.

    ``math``: equal after normalisation, or equal as exact numbers (``\\frac12``, ``0.5``, ``1/2``),
    or symbolically equivalent according to math-verify (``\\sqrt{8}`` and ``2\\sqrt{2}``). Safe to
    call from any thread; off the main thread math-verify runs without its alarm-based timeout, so
    long answers, plain words and expressions that would build enormous integers skip the symbolic
    step. ``code`` and ``general``: equal after normalisation.
    """
    _check_task(task)
    na, nb = normalize_answer(a, task), normalize_answer(b, task)
    if task != "math":
        return na == nb
    return _MathJudge().same(na, nb)


# ---------------------------------------------------------------------------------------------
# Voting
# ---------------------------------------------------------------------------------------------


TIE_RULES = ("more finished traces", "earlier first appearance")
"""How clusters with equal votes are ordered, first rule first."""


@dataclass(frozen=True)
class VoteResult:
    """Outcome of a majority vote over extracted answers."""

    winner: str | None
    """The representative of the first-ranked cluster; None when no input had an answer."""
    tally: list[tuple[str, int]]
    """``(representative, count)`` per cluster, most votes first, ties broken by :data:`TIE_RULES`."""
    clusters: list[list[int]]
    """Input indices of each cluster's members, in the order of ``tally``."""
    extracted: int
    """How many inputs had an answer."""
    tied: list[str] = field(default_factory=list)
    """When the top vote count is shared: the representatives sharing it, in ranked order."""
    tie_rule: str | None = None
    """When ``tied``: the rule of :data:`TIE_RULES` that put the winner first."""


def vote(answers: Sequence[str | None], task: str = "math", finished: Sequence[bool] | None = None) -> VoteResult:
    """Cluster equivalent answers and rank the clusters by size.

    Each answer joins the first cluster (in order of appearance) whose representative it is
    equivalent to, else starts a new one; the representative is the cluster's first answer as
    written (surrounding whitespace removed). None and blank answers are not votes.

    Ties are broken deterministically, in the order of :data:`TIE_RULES`: the cluster with more
    finished traces (``finished[i]``: the trace of answer ``i`` ended on its own, not at the token
    budget) first, then the cluster whose first answer appeared earlier. A tie for first place is
    reported in ``tied`` and ``tie_rule``.
    """
    _check_task(task)
    judge = _MathJudge() if task == "math" else None
    representatives: list[str] = []
    keys: list[str] = []
    members: list[list[int]] = []
    # Identical normalised answers land in the same cluster without a pairwise comparison.
    cluster_of_key: dict[str, int] = {}
    extracted = 0
    for index, answer in enumerate(answers):
        if answer is None or not answer.strip():
            continue
        extracted += 1
        key = normalize_answer(answer, task)
        cluster = cluster_of_key.get(key)
        if cluster is None and judge is not None:
            cluster = next((c for c, rep_key in enumerate(keys) if judge.same(key, rep_key)), None)
        if cluster is None:
            cluster = len(keys)
            representatives.append(answer.strip())
            keys.append(key)
            members.append([])
        cluster_of_key[key] = cluster
        members[cluster].append(index)

    def finished_count(cluster: int) -> int:
        return sum(1 for i in members[cluster] if finished is not None and i < len(finished) and finished[i])

    # Clusters are numbered in order of first appearance, so the index is the last tie-breaker.
    order = sorted(range(len(keys)), key=lambda c: (-len(members[c]), -finished_count(c), c))
    tally = [(representatives[c], len(members[c])) for c in order]
    tied_clusters = [c for c in order if len(members[c]) == len(members[order[0]])] if order else []
    tied: list[str] = []
    tie_rule = None
    if len(tied_clusters) > 1:
        tied = [representatives[c] for c in tied_clusters]
        first, second = tied_clusters[0], tied_clusters[1]
        tie_rule = TIE_RULES[0] if finished_count(first) != finished_count(second) else TIE_RULES[1]
    return VoteResult(
        winner=tally[0][0] if tally else None,
        tally=tally,
        clusters=[members[c] for c in order],
        extracted=extracted,
        tied=tied,
        tie_rule=tie_rule,
    )


def _check_task(task: str) -> None:
    if task not in _TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(_TASKS)}")
