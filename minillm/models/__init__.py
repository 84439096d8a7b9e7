"""Models built from ``minillm.nn``: GPT (GPT-2's architecture) and its configuration."""

from .gpt import GPT, PRESETS, GPTConfig, gpt_num_parameters

__all__ = ["GPT", "GPTConfig", "PRESETS", "gpt_num_parameters"]
