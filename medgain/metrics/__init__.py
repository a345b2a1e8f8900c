"""medgain.metrics."""
