"""Dagster assets: thin wrappers over the llava_core stage functions, one module per stage."""
