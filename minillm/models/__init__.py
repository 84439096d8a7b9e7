"""Models built from ``minillm.nn``: GPT (GPT-2's architecture, or Llama's / Qwen3's by configuration)."""

from .gpt import GPT, LLAMA_STYLE, PRESETS, GPTConfig, gpt_num_parameters, llama_style

__all__ = ["GPT", "GPTConfig", "PRESETS", "LLAMA_STYLE", "gpt_num_parameters", "llama_style"]
