"""The LLaVA model and its checkpoint formats (training folder, Hugging Face, original LLaVA), and publishing."""
