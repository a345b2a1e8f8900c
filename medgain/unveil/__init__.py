"""medgain.unveil: iterative unveiling (Bordes et al., "Iteratively unveiling new regions of interest in deep
learning models", MIDL 2018) — every region a classifier relies on, not only the most telling one.

Saliency map → smoothed into a coherent mask → the region is hidden → the image is classified again → the next
region is unveiled, until the target probability falls below a threshold.
"""

from medgain.unveil.loop import (
    STOP_REASONS,
    UnveilResult,
    Unveiler,
    smooth_mask,
    target_log_odds,
    target_probability,
    unveil,
)

__all__ = [
    "STOP_REASONS",
    "UnveilResult",
    "Unveiler",
    "smooth_mask",
    "target_log_odds",
    "target_probability",
    "unveil",
]
