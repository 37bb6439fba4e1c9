"""Measured comparisons (ratios against a baseline measured in the same run); never assertions in tests."""
