"""Measurements behind ``minillm bench``: each module times one thing and returns (or prints) figures.

    ops.py        fused ops against their compositions (time, peak memory)
    train.py      full training steps: tokens/s and peak memory
    generate.py   generation tokens/s with and without the KV cache
    tokenizer.py  tokenizer encode/train speed and memory on tinyshakespeare

``minillm/commands/bench.py`` is the command line around them.
"""
