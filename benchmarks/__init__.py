"""Measured comparisons against a baseline taken in the same run (never timed assertions in tests)."""
