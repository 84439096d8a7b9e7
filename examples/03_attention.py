"""Example 3: causal self-attention step by step, on a sentence of four tokens.

We build the attention of one head by hand from minillm ops (printing every
shape and the attention weights), then check that nn.MultiHeadAttention -
the layer GPT uses, with its fused q/k/v projection and fused attention op -
computes the same thing.

    python examples/03_attention.py
"""

import argparse
import math

import numpy as np

import minillm as mm
from minillm import functional as F
from minillm import nn


def show(name: str, t: mm.Tensor) -> None:
    print(f"{name:<28} shape {tuple(t.shape)}")


def main(argv=None) -> float:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)   # no options; --help
    mm.manual_seed(0)
    np.set_printoptions(precision=3, suppress=True)
    words = ["the", "cat", "sat", "down"]
    B, T, C, H = 1, len(words), 8, 2           # batch, time, width, heads
    Dh = C // H

    # token vectors: in GPT these come from the embedding tables
    x = mm.Tensor(np.random.default_rng(0).standard_normal((B, T, C)).astype(np.float32))
    show("x (B, T, C)", x)

    attn = nn.MultiHeadAttention(C, H, init_std=0.5)
    print(f"\nthe layer: {attn}\n")

    # 1. one projection makes queries, keys and values for every head at once
    qkv = F.linear(x, attn.c_attn.weight, attn.c_attn.bias)
    show("qkv = c_attn(x) (B, T, 3C)", qkv)
    qkv = qkv.reshape(B, T, 3, H, Dh).transpose(2, 0, 3, 1, 4)
    show("split (3, B, H, T, Dh)", qkv)
    q, k, v = qkv[0], qkv[1], qkv[2]
    show("q, k, v (B, H, T, Dh)", q)

    # 2. scores: how well each query matches each key, scaled by 1/sqrt(Dh)
    scores = q @ k.transpose(0, 1, 3, 2) * (1.0 / math.sqrt(Dh))
    show("scores q kᵀ/√Dh (B, H, T, T)", scores)

    # 3. causal mask: a word may not look at later words
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    scores = mm.where(future, -np.inf, scores)

    # 4. softmax over keys: each row becomes a probability distribution
    weights = F.softmax(scores, axis=-1)
    print("\nattention weights of head 0 (row = query word, column = key word):")
    print("       " + " ".join(f"{w:>6}" for w in words))
    for word, row in zip(words, weights.numpy()[0, 0]):
        print(f"{word:>6} " + " ".join(f"{p:6.3f}" for p in row))

    # 5. each query's output is the weighted average of the values
    y = weights @ v
    show("\ny = weights v (B, H, T, Dh)", y)
    y = y.transpose(0, 2, 1, 3).reshape(B, T, C)
    show("heads side by side (B, T, C)", y)
    out = F.linear(y, attn.c_proj.weight, attn.c_proj.bias)
    show("out = c_proj(y) (B, T, C)", out)

    # the layer does all of this with fused ops
    difference = float(np.abs(attn(x).numpy() - out.numpy()).max())
    print(f"\nmax |nn.MultiHeadAttention(x) - step-by-step| = {difference:.2e}")
    return difference


if __name__ == "__main__":
    main()
