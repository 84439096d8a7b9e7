"""A published model together with its tokenizer, ready to sample from (``minillm generate --hf``).

    from minillm.weights.pretrained import load_pretrained
    model, tokenizer = load_pretrained("path/to/gpt2")            # config.json + model.safetensors (+ tokenizer files)
    model, tokenizer = load_pretrained("gpt2/", "gpt2:../shared/data/gpt2")
    model, tokenizer = load_pretrained("Qwen3-0.6B/")             # any load_hf model_type; tokenizer.json beside it
"""

from __future__ import annotations

from pathlib import Path

from .hf import load_hf
from ..checks import is_integer


def gpt2_tokenizer_spec(directory) -> str:
    """``gpt2:DIR`` when DIR holds GPT-2's tokenizer files (encoder.json + vocab.bpe), else a clear error."""
    directory = Path(directory)
    if (directory / "encoder.json").is_file() and (directory / "vocab.bpe").is_file():
        return f"gpt2:{directory}"
    raise FileNotFoundError(
        f"{directory} has no GPT-2 tokenizer files (encoder.json and vocab.bpe); "
        f"pass --tokenizer gpt2:DIR (a folder with them) or a tokenizer file"
    )


def load_pretrained(directory, tokenizer_spec: str | None = None, device: str = "cpu", model_types=("gpt2",)):
    """(model, tokenizer) from a Hugging Face directory; the tokenizer from it or from ``tokenizer_spec``.

    ``model_types``: the config.json model_types accepted (None: every one ``load_hf`` reads).
    The directory's tokenizer is its ``tokenizer.json`` (byte-level BPE) or else
    GPT-2's two files, which Hugging Face names vocab.json and merges.txt (the
    same files as encoder.json and vocab.bpe).
    """
    from ..tokenizer import BPETokenizer, load_tokenizer  # noqa: PLC0415

    directory = Path(directory)
    if tokenizer_spec is not None:
        tokenizer = load_tokenizer(tokenizer_spec)
    elif (directory / "tokenizer.json").is_file():
        tokenizer = BPETokenizer.from_hf(directory / "tokenizer.json")
    elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        tokenizer = BPETokenizer.from_gpt2_files(directory / "vocab.json", directory / "merges.txt")
    else:
        tokenizer = load_tokenizer(gpt2_tokenizer_spec(directory))
    model = load_hf(directory, device=device, model_types=model_types)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}: they do not belong together")
    return model, tokenizer


def config_eos_id(directory) -> int | None:
    """The end-of-sequence id a Hugging Face directory's config.json names (``eos_token_id``: one
    id, or a list whose first entry is the model's own end of turn), or None when it names none."""
    from .hf import read_config  # noqa: PLC0415

    if not (Path(directory) / "config.json").is_file():
        return None
    eos = read_config(directory).get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos if is_integer(eos) else None

