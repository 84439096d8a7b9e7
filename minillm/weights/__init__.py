"""Published checkpoints in and out: Hugging Face directories (gpt2, llama, qwen3) and the safetensors format.

    from minillm.weights import load_hf, save_hf
    model = load_hf("path/to/Qwen3-0.6B")       # config.json + model.safetensors (or shards) -> GPT
    save_hf(model, "out/")                      # and back, readable by transformers
    model = load_hf_gpt2("path/to/gpt2")        # the same, accepting only GPT-2
"""

from .hf import load_hf, save_hf
from .hf_gpt2 import config_from_hf, config_to_hf, load_hf_gpt2, save_hf_gpt2
from .safetensors import SafetensorsError, load_file, save_file

__all__ = ["load_hf", "save_hf", "load_hf_gpt2", "save_hf_gpt2", "config_from_hf", "config_to_hf", "load_file", "save_file",
           "SafetensorsError"]
