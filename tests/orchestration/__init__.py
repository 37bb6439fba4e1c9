"""The Dagster assets and the orchestration package: definitions, resources, automation, DVC, the UI."""
