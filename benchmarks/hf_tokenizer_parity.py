"""BPETokenizer.from_hf against the ``tokenizers`` library itself (not a minillm dependency).

Writes GPT-2's published vocabulary and merges (../shared/data/gpt2) as three tokenizer.json files —
Llama-3-style (its Split regex, ignore_merges), Qwen-style (its regex, NFC, [a, b] merges) and GPT-2's
ByteLevel — then encodes the built-in corpus and a few hard strings with both and counts mismatches:

    PYTHONPATH=. python3 benchmarks/hf_tokenizer_parity.py [GPT2_DIR]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from minillm.data.corpus import builtin_corpus
from minillm.tokenizer import BPETokenizer

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
EXTRA = ["<|begin_of_text|>", "<|im_start|>", "<think>"]
HARD = ["café déjà vu — naïve e\u0301 ｆｕｌｌ 東京 123年 🙂", "<|begin_of_text|>a<think>b</think><|endoftext|>",
        "  spaces\t\ttabs\r\n\r\nCRLF 3.14159 2,000,000 I'LL it's"]


def spec(gpt2_dir: Path, style: str) -> dict:
    vocab = json.loads((gpt2_dir / "encoder.json").read_text(encoding="utf-8"))
    merges = [m for m in (gpt2_dir / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:] if m]
    added = [{"id": 50256, "content": "<|endoftext|>", "special": True}]
    added += [{"id": 50257 + k, "content": text, "special": k < 2} for k, text in enumerate(EXTRA)]
    for token in added:
        token.update(single_word=False, lstrip=False, rstrip=False, normalized=False)
        vocab.setdefault(token["content"], token["id"])
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": style == "gpt2"}
    split = {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX if style == "llama3" else QWEN_REGEX},
             "behavior": "Isolated", "invert": False}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": "NFC"} if style == "qwen" else None,
            "pre_tokenizer": byte_level if style == "gpt2" else {"type": "Sequence", "pretokenizers": [split, byte_level]},
            "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": False,
                                                 "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": style == "llama3", "vocab": vocab,
                      "merges": [m.split(" ") for m in merges] if style == "qwen" else merges}}


def main(argv=None) -> int:
    import tokenizers  # noqa: PLC0415

    gpt2_dir = Path((argv or sys.argv[1:] or ["../shared/data/gpt2"])[0])
    texts = [builtin_corpus()] + HARD
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for style in ("llama3", "qwen", "gpt2"):
            path = Path(tmp) / f"{style}.json"
            path.write_text(json.dumps(spec(gpt2_dir, style)), encoding="utf-8")
            ours, theirs = BPETokenizer.from_hf(path), tokenizers.Tokenizer.from_file(str(path))
            n_ids, bad = 0, 0
            for text in texts:
                a = ours.encode(text, allowed_special="all")
                b = theirs.encode(text, add_special_tokens=False).ids
                n_ids += len(b)
                bad += a != b
            failures += bad
            print(f"{style:7s} tokenizers {tokenizers.__version__}: {len(texts)} texts, {n_ids:,} ids, "
                  f"{bad} texts differ")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
