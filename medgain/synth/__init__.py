"""medgain.synth: synthetic data sets with known lesion masks, one generator a module."""

from medgain.synth.capsule import LESION_KINDS, make_capsule_dataset, make_capsule_frame

__all__ = ["LESION_KINDS", "make_capsule_dataset", "make_capsule_frame"]
