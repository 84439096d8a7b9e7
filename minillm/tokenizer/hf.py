"""Hugging Face ``tokenizer.json`` files of byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2/Qwen3).

A ``tokenizer.json`` describes the ``tokenizers`` library's pipeline. For the
byte-level BPE models, the parts that decide the ids are:

    "normalizer":    null, or {"type": "NFC"} (Qwen): Unicode NFC before splitting
    "pre_tokenizer": how text is cut into chunks, then mapped to GPT-2's byte alphabet:
                     {"type": "ByteLevel", "use_regex": true}    GPT-2's own regex
                     {"type": "Sequence", "pretokenizers": [
                         {"type": "Split", "pattern": {"Regex": R}, "behavior": "Isolated"},
                         {"type": "ByteLevel", "use_regex": false}]}      regex R (Llama 3, Qwen)
    "model":         {"type": "BPE", "vocab": {byte-level string: id},
                      "merges": ["Ġ t", …] or [["Ġ", "t"], …]   (both forms exist), "ignore_merges": …}
    "added_tokens":  [{"id": 128000, "content": "<|begin_of_text|>", "special": true, …}, …]

The byte-level strings are GPT-2's printable spelling of bytes (gpt2.py), so
``from_hf`` turns the vocabulary into bytes, the merges into id pairs, and
builds an ordinary :class:`~minillm.tokenizer.BPETokenizer` with the Split
regex as its pattern and every added token as a special token. Then
``tok.encode(text, allowed_special="all")`` gives ``tokenizers``'
``encode(text, add_special_tokens=False).ids``: added tokens are cut out first,
the rest is split by the regex and byte-pair encoded with the ranked merges.

``ignore_merges: true`` (Llama 3) means "a chunk that is a token is that
token", which BPETokenizer always does; it equals running the merges when every
token is the BPE of its own bytes (true of BPE-trained vocabularies: see bpe.py).

Refused, by name, rather than silently encoded differently: other model types
(WordPiece, Unigram), byte_fallback, unk/continuing-subword/end-of-word
settings, other normalizers and pre-tokenizers, ByteLevel with
add_prefix_space, Split behaviours other than "Isolated" (or inverted), and
added tokens with lstrip/rstrip/single_word. Post-processors (which add a
BOS token when asked) and decoders are not read: decoding is bytes, always.
"""

from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path

from .bpe import BPETokenizer
from .gpt2 import chars_to_bytes, read_utf8
from .pretokenize import GPT2_PATTERN
from ..checks import is_integer


class NormalizedBPETokenizer(BPETokenizer):
    """A BPETokenizer that puts ordinary text in Unicode normal form ``normalization`` first (Qwen: NFC).

    Special (added) tokens are matched on the raw text, as ``tokenizers`` does
    for tokens it does not normalise; the pieces between them are normalised.
    """

    def __init__(self, *args, normalization: str = "NFC", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.normalization = normalization

    def encode_ordinary(self, text: str) -> list[int]:
        if not isinstance(text, str):
            return super().encode_ordinary(text)          # the base class names the type error
        return super().encode_ordinary(unicodedata.normalize(self.normalization, text))

    def save(self, path, *args, **kwargs):
        raise ValueError("this tokenizer normalises text (from a tokenizer.json); minillm's tokenizer file "
                         "cannot record that: keep and load the tokenizer.json instead")


def _pattern(pre_tokenizer, where: str) -> str:
    """The chunking regex of a ``pre_tokenizer`` entry (refusing what would chunk differently)."""
    if pre_tokenizer is None:
        raise ValueError(f"{where}: no pre_tokenizer (a byte-level BPE tokenizer needs ByteLevel)")
    if not isinstance(pre_tokenizer, dict):
        raise ValueError(f"{where}: 'pre_tokenizer' must be an object or null, got {pre_tokenizer!r}")
    kind = pre_tokenizer.get("type")
    steps = pre_tokenizer.get("pretokenizers", []) if kind == "Sequence" else [pre_tokenizer]
    regexes, byte_level = [], None
    for step in steps:
        if not isinstance(step, dict):
            raise ValueError(f"{where}: pre-tokenizer step {step!r} is not an object")
        step_kind = step.get("type")
        if step_kind == "Split":
            behavior, invert = step.get("behavior"), step.get("invert", False)
            if behavior != "Isolated" or invert:
                raise ValueError(f"{where}: Split pre-tokenizer with behavior={behavior!r}, invert={invert} "
                                 f"is not supported (only 'Isolated', not inverted)")
            pattern = step.get("pattern", {})
            if "Regex" not in pattern:
                raise ValueError(f"{where}: Split pre-tokenizer without a Regex pattern: {pattern!r}")
            regexes.append(pattern["Regex"])
        elif step_kind == "ByteLevel":
            byte_level = step
        else:
            raise ValueError(f"{where}: pre-tokenizer {step_kind!r} is not supported (Split, ByteLevel)")
    if byte_level is None:
        raise ValueError(f"{where}: the pre-tokenizer has no ByteLevel step (not a byte-level BPE tokenizer)")
    if byte_level.get("add_prefix_space", False):
        raise ValueError(f"{where}: ByteLevel add_prefix_space=true is not supported")
    if byte_level.get("use_regex", True):
        regexes.append(GPT2_PATTERN)                    # ByteLevel's own split is GPT-2's regex
    if len(regexes) != 1:
        raise ValueError(f"{where}: {len(regexes)} splitting regexes in a row are not supported (one)")
    return regexes[0]


def _is_id(value) -> bool:
    return is_integer(value) and value >= 0


def _merge_pair(merge, where: str) -> tuple[str, str]:
    """A merge in either form: "Ġ t" (one space between; the byte alphabet has none) or ["Ġ", "t"]."""
    parts = merge.split(" ") if isinstance(merge, str) else merge
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
        raise ValueError(f"{where}: merge {merge!r} is not two tokens")
    return parts[0], parts[1]


def read_tokenizer_json(path: str | os.PathLike) -> BPETokenizer:
    """A BPETokenizer (a NormalizedBPETokenizer under an NFC normalizer) from a ``tokenizer.json``."""
    path = Path(path)
    try:
        spec = json.loads(read_utf8(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "vocab" not in model:
        kind = model.get("type") if isinstance(model, dict) else None
        raise ValueError(f"{path}: not a BPE tokenizer.json (model type {kind!r}); only byte-level BPE is read")
    if not isinstance(model["vocab"], dict):
        raise ValueError(f"{path}: 'model'.'vocab' must be an object {{token: id}}, got {type(model['vocab']).__name__}")
    unsupported = [f"{key}={model[key]!r}" for key in ("byte_fallback", "unk_token", "continuing_subword_prefix",
                                                         "end_of_word_suffix", "dropout") if model.get(key)]
    normalizer = spec.get("normalizer")
    normalization = None
    if normalizer is not None and not isinstance(normalizer, dict):
        raise ValueError(f"{path}: 'normalizer' must be an object or null, got {normalizer!r}")
    if normalizer is not None:
        if normalizer.get("type") in ("NFC", "NFKC", "NFD", "NFKD"):
            normalization = normalizer["type"]
        else:
            unsupported.append(f"normalizer {normalizer.get('type')!r}")
    added = spec.get("added_tokens") or []
    if not isinstance(added, list):
        raise ValueError(f"{path}: 'added_tokens' must be a list, got {type(added).__name__}")
    for k, token in enumerate(added):
        if not (isinstance(token, dict) and isinstance(token.get("content"), str) and _is_id(token.get("id"))):
            raise ValueError(f"{path}: added token {k} needs a 'content' string and an 'id' integer, got {token!r}")
        flags = [flag for flag in ("lstrip", "rstrip", "single_word") if token.get(flag)]
        if flags:
            unsupported.append(f"added token {token.get('content')!r} with {', '.join(flags)}")
    if unsupported:
        raise ValueError(f"{path}: settings this reader does not implement: {'; '.join(unsupported)}")
    pattern = _pattern(spec.get("pre_tokenizer"), str(path))

    special_tokens = {token["content"]: int(token["id"]) for token in added}
    special_ids = set(special_tokens.values())
    vocab: dict[int, bytes] = {}
    for text, token_id in model["vocab"].items():
        if not _is_id(token_id):
            raise ValueError(f"{path}: vocab entry {text!r} has id {token_id!r}, not a non-negative integer")
        if token_id in special_ids:                        # e.g. GPT-2's <|endoftext|>, also in model.vocab
            continue
        try:
            vocab[int(token_id)] = chars_to_bytes(text)
        except ValueError:
            raise ValueError(f"{path}: vocab entry {text!r} (id {token_id}) is not a byte-level string "
                             f"and not an added token") from None
    ids_by_text = model["vocab"]
    merges = []
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = _merge_pair(merge, f"{path}: merge {rank}")
        if left not in ids_by_text or right not in ids_by_text:
            raise ValueError(f"{path}: merge {rank} {merge!r} uses a token that is not in the vocab")
        merges.append((ids_by_text[left], ids_by_text[right]))
    if normalization is None:
        return BPETokenizer(vocab, merges, pattern, special_tokens)
    return NormalizedBPETokenizer(vocab, merges, pattern, special_tokens, normalization=normalization)
