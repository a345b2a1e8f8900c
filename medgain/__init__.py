"""medgain: guided-attention (GAIN) training for medical image classifiers, built on MONAI."""

__version__ = "0.1.0"
