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
    argv[argv.index("--max-new-tokens") + 1] = "100"             # past the context of 32: the window slides
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == tokenizer.decode(generate(model, [prompt_ids], 100, temperature=0)[0].tolist()) + "\n"
    assert "[100 tokens in" in captured.err


def test_generate_hf_reads_a_llama_directory_with_its_tokenizer_json(tmp_path, capsys):
    import json  # noqa: PLC0415

    from minillm.tokenizer.gpt2 import bytes_to_unicode  # noqa: PLC0415
    from minillm.weights import save_hf  # noqa: PLC0415

    model = make_model(GPTConfig.from_preset("llama-tiny", vocab_size=257, context_length=32))
    save_hf(model, tmp_path / "llama")
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}     # a byte-level tokenizer.json, no merges
    spec = {"added_tokens": [{"id": 256, "content": "<|endoftext|>", "special": True}],
            "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
            "model": {"type": "BPE", "vocab": vocab, "merges": []}}
    (tmp_path / "llama" / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    argv = ["generate", "--hf", str(tmp_path / "llama"), "--prompt", "hé", "--max-new-tokens", "8",
            "--temperature", "0", "--ignore-eos"]
    assert main(argv) == 0
    tokenizer = BPETokenizer.from_hf(tmp_path / "llama" / "tokenizer.json")
    expected = generate(model, [tokenizer.encode("hé")], 8, temperature=0)[0]
    assert capsys.readouterr().out == tokenizer.decode(expected.tolist()) + "\n"
    argv[1] = "--hf-gpt2"                                        # the GPT-2-only alias refuses, naming the type
    assert main(argv) != 0
    assert "model_type is 'llama', but only 'gpt2'" in capsys.readouterr().err


def test_generate_hf_stops_at_the_end_token_its_config_names(tmp_path, capsys):
    import json  # noqa: PLC0415

    from minillm.tokenizer.gpt2 import bytes_to_unicode  # noqa: PLC0415
    from minillm.weights import save_hf  # noqa: PLC0415

    model = make_model(GPTConfig.from_preset("llama-tiny", vocab_size=257, context_length=32))
    save_hf(model, tmp_path / "llama")
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    spec = {"added_tokens": [{"id": 256, "content": "<|endoftext|>", "special": True}],
            "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
            "model": {"type": "BPE", "vocab": vocab, "merges": []}}
    (tmp_path / "llama" / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    tokenizer = BPETokenizer.from_hf(tmp_path / "llama" / "tokenizer.json")
    prompt = tokenizer.encode("hé")
    greedy = generate(model, [prompt], 8, temperature=0)[0, len(prompt):].tolist()
    stop = max(i for i, token in enumerate(greedy) if greedy.index(token) == i)    # a token new at step i
    config_path = tmp_path / "llama" / "config.json"
    config = json.loads(config_path.read_text())
    config["eos_token_id"] = [greedy[stop], 3]                 # a list, as Llama 3 writes it: the first ends
    config_path.write_text(json.dumps(config))
    argv = ["generate", "--hf", str(tmp_path / "llama"), "--prompt", "hé", "--max-new-tokens", "8",
            "--temperature", "0"]
    assert main(argv) == 0
    assert capsys.readouterr().out == tokenizer.decode(prompt + greedy[:stop]) + "\n"
    assert main(argv + ["--ignore-eos"]) == 0                   # goes on; the end token is never printed
    shown = [token for token in greedy if token != greedy[stop]]
    assert capsys.readouterr().out == tokenizer.decode(prompt + shown) + "\n"
