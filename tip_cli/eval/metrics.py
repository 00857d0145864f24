"""Evaluation metrics over n graded samples per problem: avg@n, pass@k, maj@n, and their breakdowns.

Metric names (the caller namespaces them, e.g. `eval/math500/avg@8`):
  avg@n          mean accuracy over all problems x n samples
  pass@k         unbiased chance that at least one of k samples (drawn from the n) is correct, averaged over problems
  maj@n          accuracy of the majority-voted answer of the n samples
  no_answer      fraction of samples without a boxed answer (pred None)
  response_len   mean response length in tokens
  num_problems   how many problems were scored
  by_subject/<subject>/avg@n, by_level/<level>/avg@n   avg@n within each value of meta["subject"] / meta["level"]
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from statistics import fmean
from typing import Any

from tip_cli.grading import grade


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which avoids the huge binomials.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def majority_vote(preds: Sequence[str | None]) -> str | None:
    """The most common answer among the non-None preds; a tie goes to the answer seen first. None if none answered."""
    counts = Counter(p for p in preds if p is not None)
    if not counts:
        return None
    # Counter keeps first-seen order and max returns the first of equal counts
    return max(counts, key=counts.__getitem__)


def grade_pred(pred: str, gold: str) -> bool:
    """Whether an extracted answer (a `Verdict.pred`) is correct: grade it as if it were the response's last box."""
    return grade(f"\\boxed{{{pred}}}", gold).correct


def summarize(
    records: Sequence[dict[str, Any]], ks: Sequence[int], is_correct: Callable[[str, str], bool] = grade_pred
) -> dict[str, float]:
    """The metrics above for per-problem records with n samples each.

    A record holds `id`, `gold`, `meta` (dict), and per sample: `correct` (list[bool]), `preds` (list[str | None]),
    `response_lens` (list[int]). `ks` selects pass@k (values above n are skipped); `is_correct(pred, gold)` grades
    the majority answer.
    """
    if not records:
        raise ValueError("summarize: no records to score")
    sizes = {len(r["correct"]) for r in records}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(
            f"summarize: every record needs the same number n >= 1 of samples; got sizes {sorted(sizes)}"
        )
    n = sizes.pop()
    acc_P = [fmean(r["correct"]) for r in records]  # per-problem accuracy
    out: dict[str, float] = {"num_problems": len(records), f"avg@{n}": fmean(acc_P)}
    for k in sorted(set(ks)):
        if k <= n:
            out[f"pass@{k}"] = fmean(pass_at_k(n, sum(r["correct"]), k) for r in records)
    maj_P = [majority_vote(r["preds"]) for r in records]
    out[f"maj@{n}"] = fmean(
        m is not None and is_correct(m, r["gold"]) for m, r in zip(maj_P, records, strict=True)
    )
    out["no_answer"] = fmean(p is None for r in records for p in r["preds"])
    out["response_len"] = fmean(length for r in records for length in r["response_lens"])
    for key in ("subject", "level"):
        groups: dict[str, list[float]] = defaultdict(list)
        for acc, r in zip(acc_P, records, strict=True):
            if key in r.get("meta", {}):
                groups[str(r["meta"][key])].append(acc)
        for value in sorted(groups):
            out[f"by_{key}/{value}/avg@{n}"] = fmean(groups[value])
    return out
