"""medgain.handlers."""
