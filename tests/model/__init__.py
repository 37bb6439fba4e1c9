"""The model package (llava_core/model): the state-dict key maps, the HF and original-LLaVA formats, publishing."""
