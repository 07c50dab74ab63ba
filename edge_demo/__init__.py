"""fieldid edge_demo."""
