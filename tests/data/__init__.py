"""The data stages (llava_core/data): sources, conversion, images, prompts, the HDF5 writer and its gate."""
