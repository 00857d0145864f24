"""metrics.py: pass@k against brute-force enumeration, majority-vote ties, summarize on hand-built records."""

from itertools import combinations
from math import comb

import pytest

from tip_cli.eval.metrics import majority_vote, pass_at_k, summarize


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """The fraction of all k-subsets of n samples (c of them correct) holding at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_stable():
    n, c, k = 1000, 7, 64
    exact = 1 - comb(n - c, k) / comb(n, k)  # Python ints: exact binomials, then one float division
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    assert pass_at_k(n, 0, k) == 0.0
    assert pass_at_k(n, 1, 1) == pytest.approx(1 / n)


@pytest.mark.parametrize(("n", "c", "k"), [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_majority_vote():
    assert majority_vote(["2", "3", "3", None, None, None]) == "3"  # None never wins
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None
    assert majority_vote(["7"]) == "7"


def test_majority_vote_tie_goes_to_first_seen():
    assert majority_vote(["a", "b", "b", "a"]) == "a"
    assert majority_vote(["b", "a", "a", "b"]) == "b"
    assert majority_vote([None, "c", "d"]) == "c"


def exact_match(pred: str, gold: str) -> bool:
    return pred == gold


RECORDS = [
    {
        "id": "p0",
        "gold": "1",
        "meta": {"subject": "Algebra", "level": 1},
        "correct": [True, True, False, False],
        "preds": ["1", "1", "2", None],
        "response_lens": [10, 20, 30, 40],
    },
    {
        "id": "p1",
        "gold": "5",
        "meta": {"subject": "Algebra", "level": 3},
        "correct": [False, False, False, True],
        "preds": ["4", "4", None, "5"],
        "response_lens": [1, 2, 3, 4],
    },
    {
        "id": "p2",
        "gold": "9",
        "meta": {"subject": "Geometry", "level": 3},
        "correct": [False, False, False, False],
        "preds": [None, None, None, None],
        "response_lens": [5, 5, 5, 5],
    },
]


def test_summarize_hand_built_records():
    out = summarize(RECORDS, ks=[1, 2, 4, 8], is_correct=exact_match)
    acc = [2 / 4, 1 / 4, 0 / 4]
    assert out["num_problems"] == 3
    assert out["avg@4"] == pytest.approx(sum(acc) / 3)
    assert out["pass@1"] == pytest.approx(out["avg@4"])  # pass@1 is the mean accuracy
    assert out["pass@2"] == pytest.approx((brute_pass_at_k(4, 2, 2) + brute_pass_at_k(4, 1, 2) + 0) / 3)
    assert out["pass@4"] == pytest.approx(2 / 3)  # any correct sample among all four
    assert "pass@8" not in out  # k > n is skipped
    # p0 votes "1" (right), p1 votes "4" (wrong), p2 has no answer
    assert out["maj@4"] == pytest.approx(1 / 3)
    assert out["no_answer"] == pytest.approx(6 / 12)
    assert out["response_len"] == pytest.approx((100 + 10 + 20) / 12)
    assert out["by_subject/Algebra/avg@4"] == pytest.approx((acc[0] + acc[1]) / 2)
    assert out["by_subject/Geometry/avg@4"] == pytest.approx(acc[2])
    assert out["by_level/1/avg@4"] == pytest.approx(acc[0])
    assert out["by_level/3/avg@4"] == pytest.approx((acc[1] + acc[2]) / 2)


def test_summarize_default_grader_uses_math_verify():
    records = [
        {
            "id": "q",
            "gold": "\\frac{1}{2}",
            "meta": {},
            "correct": [True, True, False],
            "preds": ["0.5", "\\frac{1}{2}", "\\frac{1}{2}"],
            "response_lens": [3, 3, 3],
        }
    ]
    out = summarize(records, ks=[1])
    assert out["maj@3"] == 1.0  # the vote "\frac{1}{2}" (2 of 3) is re-graded with math-verify
    assert not any(k.startswith("by_") for k in out)  # no subject / level in meta, no breakdowns
    out = summarize([{**records[0], "preds": ["0.25", "0.25", "\\frac{1}{2}"]}], ks=[1])
    assert out["maj@3"] == 0.0


def test_summarize_rejects_empty_or_ragged_records():
    with pytest.raises(ValueError):
        summarize([], ks=[1])
    with pytest.raises(ValueError, match="same number"):
        summarize([RECORDS[0], {**RECORDS[1], "correct": [True]}], ks=[1])
