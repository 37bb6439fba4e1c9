"""Tokenizer loading with the checks every stage relies on (Llama conventions: BOS, EOS `</s>`, pad)."""

from __future__ import annotations

from functools import lru_cache

from transformers import AutoTokenizer, PreTrainedTokenizerBase


class TokenizerError(ValueError):
    """A tokenizer that lacks what the pipeline needs; the message says what is missing."""


@lru_cache(maxsize=4)
def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Load a Hugging Face tokenizer folder (or hub id) and check its special tokens.

    A tokenizer without a pad token gets its unk token as pad (the Llama/LLaVA convention, pad id 0).
    """
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:  # a missing, empty or damaged folder (JSON errors too)
        raise TokenizerError(f"tokenizer {path!r} cannot be loaded: {type(e).__name__}: {e}") from None
    missing = [name for name in ("bos_token_id", "eos_token_id") if getattr(tok, name) is None]
    if missing:
        raise TokenizerError(f"tokenizer {path!r} lacks {', '.join(missing)}; a Llama-style BOS and EOS are required")
    if tok.pad_token_id is None:
        if tok.unk_token_id is None:
            raise TokenizerError(f"tokenizer {path!r} has neither a pad nor an unk token to pad with")
        tok.pad_token = tok.unk_token
    return tok
