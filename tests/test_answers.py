"""Answer extraction, normalisation, equivalence and voting."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import pytest

from markov_rsa import _answers
from markov_rsa._answers import (
    VoteResult,
    answers_equivalent,
    extract_answer,
    normalize_answer,
    vote,
)

# --- extraction -----------------------------------------------------------------------------------


def test_boxed_with_nested_braces() -> None:
    assert extract_answer(r"so the answer is $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"


def test_last_box_wins() -> None:
    text = r"First guess \boxed{3}. On reflection it is \boxed{4}."
    assert extract_answer(text) == "4"


def test_no_box_is_none() -> None:
    assert extract_answer("The answer is 4.") is None
    assert extract_answer("") is None


def test_boxed_without_braces() -> None:
    assert extract_answer(r"hence $\boxed 5$") == "5"
    assert extract_answer(r"hence \boxed 42") == "42"


def test_fbox_and_escaped_set_braces() -> None:
    assert extract_answer(r"\fbox{7}") == "7"
    assert extract_answer(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"


def test_unclosed_last_box_falls_back_to_last_complete_one() -> None:
    # A trace cut off mid-answer must not lose the answer it gave earlier.
    assert extract_answer(r"\boxed{12} then later \boxed{\frac{1}{") == "12"


def test_code_fence_extraction_takes_last_block() -> None:
    text = "First try:\n```python\nprint(1)\n```\nBetter:\n```python\ndef f(x):\n    return x + 1   \n\n```\n"
    assert extract_answer(text, "code") == "def f(x):\n    return x + 1"


def test_code_without_fence_is_none() -> None:
    assert extract_answer("def f(): pass", "code") is None
    assert extract_answer("```python\nprint(1)\n", "code") is None


def test_final_answer_extraction() -> None:
    text = "Reasoning...\nFinal answer: Paris\nFINAL ANSWER: Lyon is wrong\nfinal answer: Rome.\nThanks"
    assert extract_answer(text, "general") == "Rome."


def test_final_answer_markdown_and_next_line() -> None:
    assert extract_answer("**Final Answer:** Paris", "general") == "Paris"
    assert extract_answer("Final answer:\n\n  Berlin\n", "general") == "Berlin"
    assert extract_answer(r"Final answer: $\boxed{7}$", "general") == "7"


def test_general_falls_back_to_box() -> None:
    assert extract_answer(r"it is \boxed{blue}", "general") == "blue"
    assert extract_answer("no marker here", "general") is None


def test_unknown_task_is_rejected() -> None:
    with pytest.raises(ValueError):
        extract_answer("x", "poetry")


# --- normalisation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("042", "42"),
        ("1,000", "1000"),
        ("x = 5", "5"),
        (r"\dfrac{1}{2}", r"\frac{1}{2}"),
        (r"\frac12", r"\frac{1}{2}"),
        (r"$\left( 1, 2 \right)$", "(1,2)"),
        (r"5\text{ cm}", "5"),
        (r"\text{yes}", "yes"),
        (r"90^\circ", "90"),
        ("90°", "90"),
        ("7.", "7"),
        (r"1\,000", "1000"),
        (r"\(3\)", "3"),
        (r"\boxed{\boxed{3}}", "3"),
        (r"\pi r^2", r"\pi r^2"),
    ],
)
def test_normalize_math(raw: str, normal: str) -> None:
    assert normalize_answer(raw) == normal


def test_normalize_code_and_general() -> None:
    assert normalize_answer("\n\nx = 1   \ny = 2\t\n\n", "code") == "x = 1\ny = 2"
    assert normalize_answer("  The   Eiffel\tTower!! ", "general") == "the eiffel tower"


# --- equivalence --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("042", "42"),
        (r"\frac12", "0.5"),
        (r"\dfrac{1}{2}", "1/2"),
        ("1,000", "1000"),
        ("x = 5", "5"),
        (r"\sqrt{8}", r"2\sqrt{2}"),
        (r"\frac{3\pi}{4}", r"3\pi/4"),
        ("2.50", r"\frac{5}{2}"),
        (r"\{1,2\}", r"\{2,1\}"),
    ],
)
def test_equivalent(a: str, b: str) -> None:
    assert answers_equivalent(a, b)
    assert answers_equivalent(b, a)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("3", "4"),
        (r"\pi", "3.14159"),
        (r"\sqrt{2}", "1.41"),
        ("yes", "sey"),  # words are not products of symbols
        (r"2^{2^{100}}", "5"),  # too large to build: decided without sympy, and quickly
    ],
)
def test_not_equivalent(a: str, b: str) -> None:
    assert not answers_equivalent(a, b)
    assert not answers_equivalent(b, a)


def test_other_tasks_compare_normalised_strings() -> None:
    assert answers_equivalent("Paris.", "paris", "general")
    assert not answers_equivalent("0.5", "1/2", "general")
    assert answers_equivalent("x = 1  \n", "x = 1", "code")


def test_equivalence_off_the_main_thread() -> None:
    # math-verify's own timeouts need the main thread; from a worker it must still answer, not raise.
    results: dict[str, bool] = {}

    def work() -> None:
        results["sqrt"] = answers_equivalent(r"\sqrt{8}", r"2\sqrt{2}")
        results["pi"] = answers_equivalent(r"\pi", "3.14159")
        results["tower"] = answers_equivalent(r"10^{10^{10}}", "5")

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert results == {"sqrt": True, "pi": False, "tower": False}


# --- voting -------------------------------------------------------------------------------------


def test_vote_clusters_equivalent_answers() -> None:
    result = vote([r"\frac12", "7", "0.5", "1/2", "7", None, "9"])
    assert result == VoteResult(
        winner=r"\frac12",
        tally=[(r"\frac12", 3), ("7", 2), ("9", 1)],
        clusters=[[0, 2, 3], [1, 4], [6]],
        extracted=6,
    )


def test_vote_ties_go_to_first_appearance() -> None:
    result = vote(["5", "3", "3", "5", "8"])
    assert result.winner == "5"
    assert result.tally == [("5", 2), ("3", 2), ("8", 1)]
    assert result.clusters == [[0, 3], [1, 2], [4]]


def test_vote_representative_is_the_first_answer_as_written() -> None:
    result = vote(["  042 ", "42", "x = 42"])
    assert result.tally == [("042", 3)]


def test_vote_ignores_none_and_blank() -> None:
    result = vote([None, "4", None, "  ", "4"])
    assert result.winner == "4"
    assert result.extracted == 2
    assert result.clusters == [[1, 4]]


def test_vote_all_none() -> None:
    result = vote([None, None])
    assert result == VoteResult(winner=None, tally=[], clusters=[], extracted=0)
    assert vote([]).winner is None


def test_vote_general_task() -> None:
    result = vote(["Paris", "paris.", "Rome", None], "general")
    assert result.tally == [("Paris", 2), ("Rome", 1)]
    assert result.extracted == 3


def test_vote_off_the_main_thread() -> None:
    box: list[VoteResult] = []
    worker = threading.Thread(target=lambda: box.append(vote([r"\sqrt{8}", r"2\sqrt{2}", "3"])))
    worker.start()
    worker.join(timeout=60)
    assert box and box[0].tally == [(r"\sqrt{8}", 2), ("3", 1)]


def test_vote_parses_each_distinct_answer_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # 32 answers with a few distinct values must cost one parse per distinct value, not one per pair.
    tools = _answers._math_verify()
    assert tools is not None
    parsed: list[str] = []

    def counting_parse(text: str, **kwargs: Any) -> list[Any]:
        parsed.append(text)
        return tools.parse(text, **kwargs)

    counting = dataclasses.replace(tools, parse=counting_parse)
    monkeypatch.setattr(_answers, "_math_verify", lambda: counting)
    values = [r"\frac{7}{3}", r"\sqrt{5}", r"2+\sqrt{3}", r"\frac{1+\sqrt{5}}{2}", r"3\sqrt{2}"]
    result = vote([values[i % len(values)] for i in range(32)])
    assert [count for _, count in result.tally] == [7, 7, 6, 6, 6]
    assert sorted(parsed) == sorted(set(parsed))
    assert len(parsed) <= len(values)


# --- answers seen in real runs --------------------------------------------------------------------


def test_nested_boxes_hold_one_answer() -> None:
    assert extract_answer(r"so \boxed{\boxed{3820}}.") == "3820"
    assert extract_answer(r"\boxed{ \fbox{\frac{1}{2}} }") == r"\frac{1}{2}"
    assert vote([extract_answer(r"\boxed{\boxed{3820}}"), extract_answer(r"\boxed{3820}")]).tally == [("3820", 2)]


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        (r"\boxed{160 + 80 + 20 = 360}", "360"),
        (r"\boxed{2 \cdot 3 = 6}", "6"),
        (r"\boxed{\frac{6}{4} = \frac{3}{2} = 1.5}", "1.5"),
        # Equations with unknowns are answers in their own right and stay whole.
        (r"\boxed{x^2 + y^2 = 1}", "x^2 + y^2 = 1"),
        (r"\boxed{y = 2x + 3}", "y = 2x + 3"),
        (r"\boxed{a \leq 3}", r"a \leq 3"),
        (r"\boxed{f(x) = 3}", "f(x) = 3"),
        (r"\boxed{3 <= 4}", "3 <= 4"),
    ],
)
def test_chain_of_equalities_gives_its_right_hand_side(text: str, answer: str) -> None:
    assert extract_answer(text) == answer


def test_vote_ties_prefer_finished_traces_then_first_appearance() -> None:
    by_finish = vote(["0", "42", "0", "42"], finished=[False, True, False, False])
    assert by_finish.winner == "42"
    assert by_finish.tied == ["42", "0"] and by_finish.tie_rule == "more finished traces"
    by_order = vote(["0", "42"], finished=[True, True])
    assert by_order.winner == "0" and by_order.tie_rule == "earlier first appearance"
    assert vote(["0", "42", "42"]).tie_rule is None and vote(["0", "42", "42"]).tied == []
    # The same inputs always give the same order.
    assert {tuple(vote(["7", "5", "6"], finished=[True, True, True]).tally) for _ in range(3)} == {
        (("7", 1), ("5", 1), ("6", 1))
    }
