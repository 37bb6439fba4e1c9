"""Dagster Definitions, resources and jobs for the LLaVA pipeline."""
