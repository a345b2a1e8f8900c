"""What an operating point chosen on a finite validation split is worth: the bound of its false-alarm rate."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "CONFIDENCE",
    "format_percent_upper",
    "fpr_upper_bound",
    "negatives_needed",
    "operating_point_words",
]

#: the one-sided confidence level of every false-alarm bound
CONFIDENCE = 0.95
#: what the negatives of an operating point are called when the model file does not say
DEFAULT_UNIT = "healthy validation samples"


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (exact for any n)."""
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k >= n else 0.0
    i = np.arange(k + 1, dtype=np.float64)
    log_choose = np.array([math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) for j in range(k + 1)])
    log_terms = log_choose + i * math.log(p) + (n - i) * math.log1p(-p)
    top = float(log_terms.max())
    return float(min(1.0, math.exp(top) * np.exp(log_terms - top).sum()))


def _check_confidence(confidence: float, caller: str) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"{caller}: confidence must be in (0, 1), got {confidence}")


def fpr_upper_bound(false_alarms: int, negatives: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper–Pearson upper bound of a false-alarm rate seen as ``false_alarms`` of ``negatives``.

    The largest rate ``p`` still compatible, at ``confidence``, with so few false alarms: the ``p`` at which
    P(X <= false_alarms | negatives, p) = 1 - confidence (found by bisection on the binomial CDF). With no false
    alarm it is ``1 - (1 - confidence) ** (1 / negatives)``: 0 of 28 gives 0.1015, 0 of 3,000 gives 0.000998.

    Args:
        false_alarms: negatives flagged at the threshold, 0 <= false_alarms <= negatives.
        negatives: negatives the threshold was measured on.
        confidence: one-sided confidence level in (0, 1).

    Returns:
        The bound in [0, 1]; 1.0 when there is no negative or every negative was flagged.

    Raises:
        ValueError: when the counts are negative, not whole or inconsistent, or ``confidence`` is outside (0, 1).
    """
    _check_confidence(confidence, "fpr_upper_bound")
    if int(false_alarms) != false_alarms or int(negatives) != negatives or not 0 <= false_alarms <= negatives:
        raise ValueError(
            "fpr_upper_bound: needs whole counts with 0 <= false_alarms <= negatives, "
            f"got {false_alarms} of {negatives}"
        )
    k, n, alpha = int(false_alarms), int(negatives), 1.0 - confidence
    if k == n:
        return 1.0
    if k == 0:
        return -math.expm1(math.log(alpha) / n)
    low, high = k / n, 1.0  # the CDF falls from >= 1/2 at p = k/n to 0 at p = 1
    for _ in range(200):
        mid = 0.5 * (low + high)
        if _binomial_cdf(k, n, mid) > alpha:
            low = mid
        else:
            high = mid
        if high - low <= 1e-15:
            break
    return high


def negatives_needed(max_fpr: float, confidence: float = CONFIDENCE) -> int:
    """Fewest negatives on which zero false alarms bound the false-alarm rate by ``max_fpr`` (see
    :func:`fpr_upper_bound`): 2,995 for 0.1 %, 5,990 for 0.05 %.

    Raises:
        ValueError: when ``max_fpr`` is outside (0, 1) or ``confidence`` outside (0, 1).
    """
    _check_confidence(confidence, "negatives_needed")
    if not 0.0 < max_fpr < 1.0:
        raise ValueError(f"negatives_needed: max_fpr must be in (0, 1), got {max_fpr}")
    n = max(1, math.ceil(math.log(1.0 - confidence) / math.log1p(-max_fpr)))
    while n > 1 and fpr_upper_bound(0, n - 1, confidence) <= max_fpr:  # guard the rounding of the logarithms
        n -= 1
    while fpr_upper_bound(0, n, confidence) > max_fpr:
        n += 1
    return n


def format_percent_upper(rate: float) -> str:
    """A rate as a percentage rounded *up*, so that an upper bound is never understated: one decimal from 1 %
    (0.10147 → "10.2 %"), two significant digits below (0.000998 → "0.10 %")."""
    percent = min(100.0, 100.0 * rate)
    if percent <= 0.0:
        return "0 %"
    decimals = 1 if percent >= 1.0 else 1 - math.floor(math.log10(percent))
    rounded = math.ceil(percent * 10.0**decimals - 1e-9) / 10.0**decimals
    if percent < 1.0 and rounded >= 10.0 ** (2 - decimals):  # rounding up gained a digit (0.0998 → 0.100)
        decimals -= 1
    return f"{rounded:.{decimals}f} %"


def _count(value: Any) -> int | None:
    """A stored count as an int, None when absent or not finite."""
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return int(value) if math.isfinite(value) else None


def operating_point_words(point: Mapping[str, Any], unit: str | None = None) -> str:
    """The operating point of a model file in the words a clinician reads: what its false-alarm rate is known to be.

    For example "chosen on 28 normal frames: its false-alarm rate is only known to be ≤ 10.2 %; the 0.1 % budget
    needs ≥ 2,995" when the bound exceeds the budget, "chosen on 3,000 normal frames with 0 false alarms: its
    false-alarm rate is ≤ 0.10 % (95 % confidence), within the 0.1 % budget" when it does not. A model file
    written before the counts were stored says that the bound is unknown.

    Args:
        point: the ``operating_point`` of a model file (:func:`medgain.model_file.load_operating_point`).
        unit: what the negatives are, e.g. "normal frames"; default the point's ``unit``, else "healthy
            validation samples".

    Returns:
        One sentence, without a final full stop.
    """
    unit = unit or point.get("unit") or DEFAULT_UNIT
    if point.get("threshold") is None:
        return f"no operating point ({point.get('reason') or 'validation gave no finite threshold'}): no decision"
    budget = point.get("max_fpr")
    has_budget = budget is not None and 0.0 < float(budget) < 1.0
    budget_words = f"the {100.0 * float(budget):g} % budget" if has_budget else None
    negatives, false_alarms = _count(point.get("negatives")), _count(point.get("false_alarms"))
    if negatives is None or false_alarms is None:
        return (
            f"the false-alarm rate of this operating point is unknown: the model file does not record how many "
            f"{unit} it was chosen on nor its false alarms there (older medgain); retrain to know it"
        )
    upper = point.get("fpr_upper")
    upper = fpr_upper_bound(false_alarms, negatives) if upper is None else float(upper)
    alarms = f" with {false_alarms:,} false alarm{'s' if false_alarms != 1 else ''}"
    chosen = f"chosen on {negatives:,} {unit}" + (alarms if false_alarms else "")
    known = f"≤ {format_percent_upper(upper)} ({CONFIDENCE * 100:g} % confidence)"
    if budget_words is None:
        return f"{chosen}: its false-alarm rate is {known}"
    if upper <= float(budget):
        return f"chosen on {negatives:,} {unit}{alarms}: its false-alarm rate is {known}, within {budget_words}"
    return (
        f"{chosen}: its false-alarm rate is only known to be ≤ {format_percent_upper(upper)}; {budget_words} needs "
        f"≥ {negatives_needed(float(budget)):,}"
    )
