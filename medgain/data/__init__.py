"""medgain.data."""
