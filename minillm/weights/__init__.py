"""Published checkpoints in and out: GPT-2 in the Hugging Face layout, and the safetensors format under it.

    from minillm.weights import load_hf_gpt2, save_hf_gpt2
    model = load_hf_gpt2("path/to/gpt2")        # config.json + model.safetensors -> GPT
    save_hf_gpt2(model, "out/")                 # and back, readable by other tools
"""

from .hf_gpt2 import config_from_hf, config_to_hf, load_hf_gpt2, save_hf_gpt2
from .safetensors import SafetensorsError, load_file, save_file

__all__ = ["load_hf_gpt2", "save_hf_gpt2", "config_from_hf", "config_to_hf", "load_file", "save_file",
           "SafetensorsError"]
