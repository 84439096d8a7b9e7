"""``minillm generate`` through ``minillm.cli.main``."""

import numpy as np

import minillm as mm
from minillm.cli import main
from minillm.generate import generate
from minillm.models import GPT, GPTConfig
from minillm.tokenizer import BPETokenizer
from minillm.weights import save_hf_gpt2


def make_model(config):
    """A small GPT with weights large enough that its logits are far from uniform (no near-ties)."""
    mm.manual_seed(0)
    model = GPT(config)
    rng = np.random.default_rng(1)
    for param in model.parameters():
        param.data[...] = rng.standard_normal(param.shape).astype(np.float32) * 0.3
    return model


def test_generate_command_streams_text(tmp_path, capsys):
    model = make_model(GPTConfig(vocab_size=257, context_length=32, n_layer=1, n_head=2, d_model=16))
    save_hf_gpt2(model, tmp_path / "hf")
    tokenizer = BPETokenizer.bytes(special_tokens=["<|endoftext|>"])
    tokenizer.save(tmp_path / "tok.json")
    argv = ["generate", "--hf-gpt2", str(tmp_path / "hf"), "--tokenizer", str(tmp_path / "tok.json"),
            "--prompt", "hé", "--max-new-tokens", "8", "--temperature", "0", "--ignore-eos"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    prompt_ids = tokenizer.encode("hé")
    expected = generate(model, [prompt_ids], 8, temperature=0)[0]
    assert printed == tokenizer.decode(expected.tolist()) + "\n"
    argv[argv.index("--max-new-tokens") + 1] = "100"
    assert main(argv) == 0                                      # clipped to the context, not an error
