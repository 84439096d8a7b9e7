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


def test_a_model_folder_given_with_the_other_kinds_option_says_which_option_reads_it(tmp_path, capsys):
    """A minillm run as --hf (was: 'RUN/tokenizer.json: not a BPE tokenizer.json'), a Hugging Face folder as
    --run or --from (was: a hint to call minillm.weights.load_hf from Python): one line naming the option."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "finetune"))
    from finetune_helpers import make_base_run, write_spam_like

    run_dir = make_base_run(tmp_path / "run")
    save_hf_gpt2(make_model(GPTConfig(vocab_size=257, context_length=32, n_layer=1, n_head=2, d_model=16)),
                 tmp_path / "hf")
    data = write_spam_like(tmp_path / "spam.tsv", n=30)
    as_run = f"{run_dir} is a minillm run (checkpoint.json, no config.json), not a Hugging Face directory: give it as"
    as_hf = f"{tmp_path / 'hf'} is a Hugging Face directory (config.json, no checkpoint.json), not a minillm run: give it as"
    for argv, message in (
            (["generate", "--hf", run_dir, "--prompt", "a"], f"{as_run} --run {run_dir}"),
            (["generate", "--hf-gpt2", run_dir, "--prompt", "a"], f"{as_run} --run {run_dir}"),
            (["generate", "--run", tmp_path / "hf", "--prompt", "a"], f"{as_hf} --hf {tmp_path / 'hf'}"),
            (["finetune", "classify", "--data", data, "--hf", run_dir, "--out", tmp_path / "out"],
             f"{as_run} --from {run_dir}"),
            (["finetune", "classify", "--data", data, "--from", tmp_path / "hf", "--out", tmp_path / "out"],
             f"{as_hf} --hf {tmp_path / 'hf'}")):
        assert main([str(a) for a in argv]) == 2
        assert capsys.readouterr().err == f"minillm: error: {message}\n"
    assert not (tmp_path / "out").exists()
