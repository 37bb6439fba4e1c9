"""Dagster assets: thin wrappers over the llava_core stage functions, one module per stage.

Stage code that imports torch (training, export, evaluation) is imported inside the asset functions, not at
module level: every step of a run with the multiprocess executor (the default) starts a process that loads the
whole code location, and the `dagster dev` webserver loads it too. Loading it then costs dagster and the light
modules only (about 1 s instead of 5-15 s), and each step imports what its own stage needs.
"""
