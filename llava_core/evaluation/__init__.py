"""Stage 5b: evaluation on held-out questions, the metrics, the judge review, single predictions."""
