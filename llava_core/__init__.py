"""The LLaVA pipeline library: config, data stages, model, training, evaluation; knows nothing of Dagster or DVC."""
