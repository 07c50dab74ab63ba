"""fieldid serve."""
