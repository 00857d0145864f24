"""The method's option names, one list each (stdlib only, so that config validation does not load torch).

The modules that implement them check their registries against these lists at import.
"""

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")  # selection.scores.token_divergence
NORMS = ("minmax", "rank", "quantile_clip")  # selection.normalize.normalize
THRESHOLDS = ("quantile", "absolute")  # selection.quadrants.threshold
QUADRANTS = ("Q1", "Q2", "Q3", "Q4")  # selection.quadrants.quadrant_of
SELECTORS = ("all", "random", "entropy", "divergence", "soft_or", "hard_or", "and", "quadrant", "teachability")  # selectors.SELECTORS
MODES = ("topk", "sample")  # selection.selectors: top-K by score, or sampled with weight score ** alpha
CAP_BY = ("divergence", "entropy", "soft_or")  # selection.selectors._cap_score
SCOPES = ("batch", "per_sequence")  # selection.selectors._pick: where the budget K is counted
