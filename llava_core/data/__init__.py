"""Stages 1-3: sources, conversion to LLaVA jsonl, the HDF5 writer and reader, the data gate."""
