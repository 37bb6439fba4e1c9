"""The training package (llava_core/training): the recipe, its launcher, sampler, dataset, observer and resume."""
