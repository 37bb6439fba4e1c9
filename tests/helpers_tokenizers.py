"""Small Hugging Face tokenizer folders with the conventions of real Llama-2/Vicuna and Mistral folders.

Built locally (no hub access) with the `tokenizers` library, the way those folders are laid out:
- `llama`: Llama-2 / Vicuna-v1.5 (`legacy: true`): SentencePiece-style BPE with byte fallback, the
  `Prepend("▁") + Replace(" ", "▁")` normaliser, `<unk>`=0 `<s>`=1 `</s>`=2, no pad token;
- `mistral`: Mistral-7B-v0.3 (`legacy: false`): a `Metaspace(prepend_scheme="first")` pre-tokeniser,
  control tokens `[INST]`, `[/INST]`, `[TOOL_CALLS]`, ... after `</s>`, no pad token;
- `llama_pad`: Llama conventions with an explicit `<pad>` appended after the vocabulary (pad != unk);
- `vicuna`: Vicuna-v1.5 / Llama-2 conventions with a hand-made vocabulary whose pieces for the system prompt,
  `USER:` and `ASSISTANT:` are those of the real Llama-2 SentencePiece model (`▁pol` `ite`, `▁user` `'` `s`,
  `▁US` `ER` `:`, `▁A` `SS` `IST` `ANT` `:`), other text as characters or bytes (`\n` is `<0x0A>`).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from llava_core.data import synthetic
from llava_core.data.prompts import SYSTEM_PROMPTS

KINDS = ("llama", "mistral", "llama_pad", "vicuna")
MISTRAL_CONTROL = ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]"]


def _corpus() -> list[str]:
    lines = list(SYSTEM_PROMPTS.values()) + ["USER: ASSISTANT:"]
    for color in synthetic.COLORS:
        for shape in synthetic.SHAPES:
            lines.append(f"What color is the {shape}? A {color} {shape}. Is there a {shape} in the image?")
    lines += [string.ascii_letters + string.digits + string.punctuation]
    return lines * 3


# Llama-2's pieces for the vicuna_v1 system prompt (30 tokens), " USER:" and " ASSISTANT:", and a few words
VICUNA_PIECES = (
    "▁A ▁chat ▁between ▁a ▁curious ▁user ▁and ▁an ▁artificial ▁intelligence ▁assistant ▁The ▁gives ▁helpful "
    "▁detailed ▁pol ite ▁answers ▁to ▁the ▁questions ▁US ER SS IST ANT ▁What ▁color ▁is ▁circle ▁square ▁red "
    "▁blue ▁How ▁many"
).split()


def _vicuna_tokenizer() -> Tokenizer:
    """BPE whose merges build each of VICUNA_PIECES from the left, one character at a time (and nothing else)."""
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{i:02X}>" for i in range(256)])}
    for ch in ["▁", *string.printable.strip()]:
        vocab.setdefault(ch, len(vocab))
    merges = []
    for piece in VICUNA_PIECES:
        for k in range(2, len(piece) + 1):
            left, right = piece[: k - 1], piece[k - 1]
            if piece[:k] not in vocab:
                vocab[piece[:k]] = len(vocab)
                merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens(specials)
    return tok


def build_tokenizer_folder(folder: Path, kind: str) -> Path:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json for `kind` into `folder`."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid: {KINDS}")
    if kind == "vicuna":
        return _save(folder, kind, _vicuna_tokenizer(), pre=None)
    specials = ["<unk>", "<s>", "</s>"] + (MISTRAL_CONTROL if kind == "mistral" else [])
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if kind == "mistral":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + 256 + 300,
        special_tokens=specials + [f"<0x{i:02X}>" for i in range(256)],
        show_progress=False,
        initial_alphabet=list(string.printable.strip()) + ["▁"],
    )
    real_pre = tok.pre_tokenizer
    # learn word pieces, as SentencePiece does, then save the folder's own pipeline
    if kind == "mistral":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.train_from_iterator(_corpus(), trainer=trainer)
    data = json.loads(tok.to_str())
    data["pre_tokenizer"] = json.loads(real_pre.__getstate__()) if real_pre is not None else None
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in specials]  # bytes: plain vocab
    return _save(folder, kind, Tokenizer.from_str(json.dumps(data)), pre=real_pre)


def _save(folder: Path, kind: str, tok: Tokenizer, pre) -> Path:
    """The folder's pipeline (Llama's normaliser unless `pre` tokenises, BOS template, decoder) and its configs."""
    if pre is None:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": kind != "mistral",
        "model_max_length": 4096,
    }
    if kind == "llama_pad":
        tok.add_special_tokens(["<pad>"])
        config["pad_token"] = "<pad>"
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special_map = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if config[k]}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    return folder
