"""medgain.losses: GAIN loss terms and the recurrent-glimpse classification, rank, step and location losses."""

from medgain.losses.focal import LogOddsFocalLoss
from medgain.losses.gain import (
    BinaryFocalLoss,
    attention_area_loss,
    attention_mining_loss,
    extra_supervision_loss,
    target_probability,
)
from medgain.losses.glimpse import (
    GlimpseLoss,
    area_location_loss,
    distance_location_loss,
    glimpse_classification_loss,
    glimpse_mask_fraction,
    glimpse_rank_loss,
    glimpse_step_loss,
    location_loss,
)

__all__ = [
    "BinaryFocalLoss",
    "GlimpseLoss",
    "LogOddsFocalLoss",
    "area_location_loss",
    "attention_area_loss",
    "attention_mining_loss",
    "distance_location_loss",
    "extra_supervision_loss",
    "glimpse_classification_loss",
    "glimpse_mask_fraction",
    "glimpse_rank_loss",
    "glimpse_step_loss",
    "location_loss",
    "target_probability",
]
