"""fieldid export."""
