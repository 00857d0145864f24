"""Answer grading with math-verify: the last \\boxed{} of a response against the gold answer."""

from __future__ import annotations

from dataclasses import dataclass

from math_verify import parse, verify


@dataclass(frozen=True)
class Verdict:
    correct: bool
    pred: str | None  # the parsed final answer; None = the response has no boxed answer


def grade(response: str, gold: str) -> Verdict:
    """Parse the response's final boxed answer and verify it against `gold` (a bare answer, e.g. "6")."""
    if "\\boxed" not in response:
        return Verdict(False, None)
    pred = parse(response)
    if not pred:
        return Verdict(False, None)
    return Verdict(bool(verify(parse(f"${gold}$"), pred)), str(pred[-1]))
