"""The evaluation package (llava_core/evaluation): answers, metrics, the judge, predict."""
