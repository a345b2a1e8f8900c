"""medgain.networks."""
