"""Build the tiny preset's tokenizer (committed under llava_core/resources/tiny_tokenizer/).

A SentencePiece-style BPE with Llama conventions: `<unk>`=0 (also the pad token, as in LLaVA), `<s>`=1,
`</s>`=2, `<image>`=3, then the 256 byte-fallback tokens `<0x00>`..`<0xFF>` (any text encodes, none maps
to unk), then merges learned from the synthetic-shapes vocabulary and the prompt templates. Deterministic:
the same corpus gives the same file.

    python scripts/build_tiny_tokenizer.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from llava_core.data import synthetic
from llava_core.data.prompts import SYSTEM_PROMPTS

SPECIALS = ["<unk>", "<s>", "</s>", "<image>"]
VOCAB_SIZE = 1024
OUT = Path(__file__).resolve().parents[1] / "llava_core" / "resources" / "tiny_tokenizer"


def corpus() -> list[str]:
    # the prompt templates are repeated so that their words become whole tokens: shorter sequences, and the
    # question's key word sits a few tokens (not a few dozen) before the answer
    templates = list(SYSTEM_PROMPTS.values()) + ["USER: ASSISTANT:", synthetic.SHORT_ANSWER]
    templates += ["Answer with the option's letter from the given choices directly."]
    lines = templates * 40
    lines += list(synthetic.CAPTION_PROMPTS) + [q for qa in synthetic.TEXT_ONLY_QA for q in qa]
    for color in synthetic.COLORS:
        for shape in synthetic.SHAPES:
            for pos in synthetic.POSITIONS:
                lines.append(f"A {color} {shape} at the {pos}, a {color} {shape}.")
                lines.append(f"What color is the {shape}? Where is the {shape}? Is there a {shape} in the image?")
                lines.append(f"Is there a {color} shape in the image?")
    lines += ["How many shapes are there in the image? yes no 1 2 3 4 5 6 7 8 9 0"]
    lines += [string.ascii_letters + string.digits + string.punctuation]
    return lines * 4


def build() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS + byte_tokens,
        show_progress=False,
        initial_alphabet=list(string.printable.strip()) + ["▁"],
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    # byte tokens are ordinary vocabulary entries in Llama (decodable, not skipped as special)
    data = json.loads(tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in SPECIALS]
    tok = Tokenizer.from_str(json.dumps(data))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    tok = build()
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=4096,
        padding_side="right",
    )
    args.out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(args.out)
    print(f"wrote {args.out} (vocab {len(fast)})")


if __name__ == "__main__":
    main()
