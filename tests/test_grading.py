"""grading.py: the last \\boxed{} against gold answers, on hand cases and on MATH-500's own reference solutions."""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tip_cli.grading import Verdict, grade, last_boxed

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MATH500 = SHARED / "math500.jsonl"
needs_math500 = pytest.mark.skipif(not MATH500.is_file(), reason=f"{MATH500} not present")


@pytest.mark.parametrize(
    ("response", "gold"),
    [
        ("So the answer is $\\boxed{6}$.", "6"),
        ("\\boxed{\\frac12}", "0.5"),
        ("\\boxed{0.5}", "\\frac{1}{2}"),
        ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{(3, \\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed{\\text{(C)}}", "\\text{(C)}"),
        ("\\boxed{-2, 1}", "1,-2"),
        ("\\boxed{x=5}", "5"),
        ("\\boxed {5}", "5"),
        ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}"),
        ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
    ],
)
def test_equivalent_forms_are_correct(response, gold):
    verdict = grade(response, gold)
    assert verdict.correct
    assert verdict.pred is not None


@pytest.mark.parametrize(
    ("response", "gold"),
    [
        ("\\boxed{7}", "6"),
        ("\\boxed{\\frac{1}{3}}", "0.5"),
        ("\\boxed{(3, \\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed{\\text{(D)}}", "\\text{(C)}"),
        ("\\boxed{1}", "1,-2"),
        ("\\boxed{3, 5}", "3, 5, 7"),
    ],
)
def test_wrong_answers_are_wrong(response, gold):
    verdict = grade(response, gold)
    assert not verdict.correct
    assert verdict.pred is not None  # answered, just wrongly


@pytest.mark.parametrize(
    "response",
    [
        "The answer is 5.",
        "The answer is $5$.",
        "Final Answer: The final answer is $5$. I hope it is correct.",
        "\\boxed{}",
        "so \\boxed{5",
        "",
    ],
)
def test_no_boxed_answer_is_wrong_with_no_pred(response):
    assert grade(response, "5") == Verdict(False, None)


def test_only_the_last_box_counts():
    response = "First try: \\boxed{3} ... no wait, \\boxed{5}"
    assert grade(response, "5").correct
    assert not grade(response, "3").correct
    assert grade(response, "3").pred == "5"
    # adjacent boxes are not merged into a set {3, 5} either
    assert grade("\\boxed{3}, \\boxed{5}", "5").correct


def test_last_boxed_balances_braces():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{  x^{2} }") == "x^{2}"
    assert last_boxed("no box") is None
    assert last_boxed("\\boxed{\\frac{1}{2}") is None  # cut off mid-answer


def test_pred_regrades_to_the_same_verdict():
    """metrics.maj@n re-grades a pred as `\\boxed{pred}`: that must agree with grading the original response."""
    for response, gold in [("\\boxed{\\dfrac12}", "0.5"), ("\\boxed{(1,2)}", "(1, 2)"), ("\\boxed{7}", "6")]:
        verdict = grade(response, gold)
        assert grade(f"\\boxed{{{verdict.pred}}}", gold) == verdict


def test_grades_off_the_main_thread():
    """math-verify's signal-based timeout would raise in a worker thread; grade must still work there."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        verdicts = list(pool.map(grade, ["\\boxed{\\frac12}", "\\boxed{3}"], ["0.5", "4"]))
    assert [v.correct for v in verdicts] == [True, False]


@needs_math500
def test_reference_solutions_grade_correct_on_math500():
    """Each reference solution's last \\boxed{} must verify against the dataset's gold answer (>= 95% of 100)."""
    rows = [json.loads(line) for line in MATH500.read_text().splitlines()[:100]]
    failures = [(r["id"], r["answer"]) for r in rows if not grade(r["solution"], r["answer"]).correct]
    assert len(failures) <= 5, failures


@needs_math500
def test_reference_solutions_do_not_match_other_gold_answers():
    """The same solutions graded against the *next* problem's gold answer must be (nearly) all wrong."""
    rows = [json.loads(line) for line in MATH500.read_text().splitlines()[:101]]
    false_pos = [
        (a["answer"], b["answer"])
        for a, b in zip(rows[:-1], rows[1:], strict=True)
        if grade(a["solution"], b["answer"]).correct
    ]
    # a few neighbours genuinely share an answer (e.g. "3" and "3"); those are the only matches allowed
    assert all(grade(f"\\boxed{{{a}}}", b).correct for a, b in false_pos)
    assert len(false_pos) <= 5, false_pos
