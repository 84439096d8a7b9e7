"""A published model together with its tokenizer, ready to sample from (``minillm generate --hf-gpt2``).

    from minillm.weights.pretrained import load_pretrained
    model, tokenizer = load_pretrained("path/to/gpt2")            # config.json + model.safetensors (+ tokenizer files)
    model, tokenizer = load_pretrained("gpt2/", "gpt2:../shared/data/gpt2")
"""

from __future__ import annotations

from pathlib import Path

from .hf_gpt2 import load_hf_gpt2


def gpt2_tokenizer_spec(directory) -> str:
    """``gpt2:DIR`` when DIR holds GPT-2's tokenizer files (encoder.json + vocab.bpe), else a clear error."""
    directory = Path(directory)
    if (directory / "encoder.json").is_file() and (directory / "vocab.bpe").is_file():
        return f"gpt2:{directory}"
    raise FileNotFoundError(
        f"{directory} has no GPT-2 tokenizer files (encoder.json and vocab.bpe); "
        f"pass --tokenizer gpt2:DIR (a folder with them) or a tokenizer file"
    )


def load_pretrained(directory, tokenizer_spec: str | None = None, device: str = "cpu"):
    """(model, tokenizer) from a Hugging Face GPT-2 directory; the tokenizer from it or from ``tokenizer_spec``.

    A Hugging Face directory names GPT-2's two tokenizer files vocab.json and
    merges.txt; they are the same files as encoder.json and vocab.bpe.
    """
    from ..tokenizer import BPETokenizer, load_tokenizer  # noqa: PLC0415

    directory = Path(directory)
    if tokenizer_spec is not None:
        tokenizer = load_tokenizer(tokenizer_spec)
    elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        tokenizer = BPETokenizer.from_gpt2_files(directory / "vocab.json", directory / "merges.txt")
    else:
        tokenizer = load_tokenizer(gpt2_tokenizer_spec(directory))
    model = load_hf_gpt2(directory, device=device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}: they do not belong together")
    return model, tokenizer
