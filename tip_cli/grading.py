"""Answer grading with math-verify: the last \\boxed{} of a response against the gold answer.

Only the last `\\boxed{...}` of a response counts: earlier boxes (scratch work, a changed mind) are ignored, and a
response without one is wrong with `pred=None`. The gold answer (bare LaTeX such as `\\frac{1}{2}`) is wrapped in
`\\boxed{}` and goes through the same math-verify extraction as the prediction, so both sides get the same LaTeX
normalisation; math-verify then decides equivalence (numeric, symbolic, sets/tuples/intervals, string equality).

math-verify bounds its sympy work with `signal.alarm`, which Python allows only in the main thread; off the main
thread (e.g. a grading thread pool) `grade` runs without that time limit instead of raising.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache

from math_verify import LatexExtractionConfig, parse, verify

# grade() hands math-verify a lone `\boxed{...}`: match it first, and never fall back to unanchored LaTeX in it.
BOXED_ONLY = (LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False),)
TIMEOUT_S = 5  # per parse / per comparison, main thread only


@dataclass(frozen=True)
class Verdict:
    correct: bool
    pred: str | None  # the final answer's LaTeX as math-verify normalised it; None = no boxed answer


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` of `text` (balanced braces), or None: no box, an empty box, or one cut off."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = start + len("\\boxed")
    while i < len(text) and text[i].isspace():
        i += 1
    if i == len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip() or None
    return None


def _timeout() -> int | None:
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _parse_boxed(answer: str) -> list:
    """math-verify's parse of `\\boxed{answer}`: [sympy expr, normalised LaTeX], [LaTeX] if sympy fails, [] on error."""
    return parse(f"\\boxed{{{answer}}}", extraction_config=BOXED_ONLY, parsing_timeout=_timeout())


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple:
    # Cached: every sample of a problem is verified against the same gold answer.
    return tuple(_parse_boxed(gold))


def grade(response: str, gold: str) -> Verdict:
    """Verify the response's last boxed answer against `gold` (a bare LaTeX answer, e.g. "6" or "\\frac{1}{2}")."""
    answer = last_boxed(response)
    if answer is None:
        return Verdict(False, None)
    pred = _parse_boxed(answer)
    pred_latex = str(pred[-1]) if pred else answer
    gold_parsed = list(_parse_gold(gold))
    correct = bool(pred and gold_parsed and verify(gold_parsed, pred, timeout_seconds=_timeout()))
    return Verdict(correct, pred_latex)
