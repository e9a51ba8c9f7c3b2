"""Training: the data layer, the `shapes` set and its oracle, and one script per stage (`python -m train`)."""
