"""Building SAM3 image models from specs, and saving/loading their weights."""
