"""Training data: the built-in corpus, text files, token files, windows and batches.

    from minillm.data import TokenDataset, builtin_corpus
    data = TokenDataset.from_texts(builtin_corpus(), tokenizer, context_length=256,
                                   cache_path="runs/pydoc.tokens")
    inputs, targets = data.get_batch("train", batch_size=8)      # int64 (8, 256), CPU
    for inputs, targets in data.iter_batches("val", 8): ...      # evaluation, in order
"""

from .corpus import builtin_corpus, load_texts
from .dataset import (TokenDataset, TokenWindows, cached_tokens, encode_documents, token_dtype,
                      tokenizer_fingerprint)

__all__ = ["builtin_corpus", "load_texts", "TokenDataset", "TokenWindows", "cached_tokens",
           "encode_documents", "token_dtype", "tokenizer_fingerprint"]
