"""medgain.transforms."""
