"""Whole fine-tuning runs on a tiny model: run directory, metrics, resume, LoRA adapters, reloading."""

import json

import numpy as np
import pytest

import minillm as mm
from minillm.finetune import FinetuneConfig, finetune, load_finetuned, load_language_model
from minillm.finetune.run import load_from_adapters
from minillm.nn.lora import load_adapters, lora_layers
from minillm.train.trainer import read_metrics

from finetune_helpers import make_base_run, write_instructions, write_spam_like

QUIET = dict(progress=False, batch_size=8)


def _silent(message):
    pass


def test_classification_run_learns_logs_accuracy_and_reloads(tmp_path):
    base = make_base_run(tmp_path / "base")
    data = write_spam_like(tmp_path / "spam.tsv", n=90)
    gpt, tok = load_language_model(base)
    config = FinetuneConfig("classify", str(data), epochs=8, trainable="all")
    result = finetune(gpt, tok, config, dict(QUIET, lr=3e-3), run_dir=tmp_path / "run", say=_silent)
    evals = read_metrics(tmp_path / "run", "eval")
    assert [e["step"] for e in evals] == [8 * i for i in range(9)]           # step 0, then each epoch (63 / 8 -> 8 steps)
    assert {"train_acc", "val_acc", "test_acc"} <= set(evals[-1])
    assert evals[-1]["train_acc"] > 0.9 > evals[0]["train_acc"]
    info = json.loads((tmp_path / "run" / "finetune.json").read_text())
    assert info["labels"] == ["ham", "spam"] and info["split_sizes"] == {"train": 63, "val": 9, "test": 18}
    # docs/finetuning.md: what `minillm train`'s run directory holds, plus finetune.json with the settings and
    # the model's shape
    assert all((tmp_path / "run" / name).exists() for name in
               ("checkpoint.json", "checkpoints", "metrics.jsonl", "tokenizer.json"))
    assert info["finetune"] == config.to_dict() and info["model_config"] == gpt.config.to_dict()
    model, _, _ = load_finetuned(tmp_path / "run")
    with mm.no_grad():
        np.testing.assert_array_equal(model.head.weight.numpy(), result.model.head.weight.numpy())


def test_an_interrupted_then_resumed_run_logs_what_a_straight_one_does(tmp_path):
    base = make_base_run(tmp_path / "base")
    data = write_spam_like(tmp_path / "spam.tsv", n=45)
    config = FinetuneConfig("classify", str(data), epochs=3, trainable="last-block")

    def run(name, stop_at=None):
        mm.manual_seed(5)
        gpt, tok = load_language_model(base)
        if stop_at is None:
            return finetune(gpt, tok, config, dict(QUIET, lr=1e-3), run_dir=tmp_path / name, say=_silent)
        from minillm.finetune import run as run_module   # interrupt: stop the Trainer part-way
        original = run_module.Trainer.fit
        run_module.Trainer.fit = lambda self: original(self, stop_at=stop_at)
        try:
            finetune(gpt, tok, config, dict(QUIET, lr=1e-3), run_dir=tmp_path / name, say=_silent)
        finally:
            run_module.Trainer.fit = original
        mm.manual_seed(99)                                   # a fresh process would not share the seed
        gpt, tok = load_language_model(base)
        return finetune(gpt, tok, config, dict(QUIET, lr=1e-3), run_dir=tmp_path / name, resume=True,
                        say=_silent)

    straight, resumed = run("straight"), run("resumed", stop_at=5)
    losses = [r["loss"] for r in read_metrics(tmp_path / "straight", "train")]
    assert [r["loss"] for r in read_metrics(tmp_path / "resumed", "train")] == losses
    assert resumed.metrics == straight.metrics


def test_lora_run_saves_adapters_that_load_onto_the_base(tmp_path):
    base = make_base_run(tmp_path / "base")
    data = write_spam_like(tmp_path / "spam.tsv", n=45)
    gpt, tok = load_language_model(base)
    config = FinetuneConfig("classify", str(data), epochs=2, lora_rank=4, lora_alpha=8)
    result = finetune(gpt, tok, config, dict(QUIET, lr=1e-3), run_dir=tmp_path / "run", say=_silent)
    C, r = 32, 4
    per_block = r * (C + 3 * C) + r * (C + C) + r * (C + 4 * C) + r * (4 * C + C)
    info = json.loads((tmp_path / "run" / "finetune.json").read_text())
    assert info["trainable_parameters"] == 2 * per_block + (C * 2 + 2)   # adapters + the new head
    # the adapters file alone, put on a fresh copy of the base, gives the trained classifier's outputs
    from minillm.finetune.classify import GPTClassifier
    fresh_gpt, _ = load_language_model(base)
    fresh = GPTClassifier(fresh_gpt, 2)
    load_adapters(fresh, tmp_path / "run" / "adapters.safetensors")
    assert len(lora_layers(fresh)) == 8
    ids, lengths = np.array([[97, 98, 122, 0]]), np.array([3])
    with mm.no_grad():
        np.testing.assert_allclose(fresh.eval()(ids, lengths).numpy(), result.model.eval()(ids, lengths).numpy(),
                                   rtol=1e-6, atol=1e-6)
    config.base = {"run": str(base)}                 # what `minillm finetune --from` records
    finetune(load_language_model(base)[0], tok, config, dict(QUIET, lr=1e-3), run_dir=tmp_path / "run2",
             say=_silent)
    rebuilt, _, _ = load_from_adapters(tmp_path / "run2")       # base run + adapters.safetensors
    saved, _, _ = load_finetuned(tmp_path / "run2")             # the checkpoint
    with mm.no_grad():
        np.testing.assert_allclose(rebuilt(ids, lengths).numpy(), saved(ids, lengths).numpy(), rtol=1e-6, atol=1e-6)


def test_sft_then_dpo(tmp_path):
    base = make_base_run(tmp_path / "base", context_length=192)   # the Alpaca preamble alone is ~150 bytes
    gpt, tok = load_language_model(base)
    sft_config = FinetuneConfig("sft", str(write_instructions(tmp_path / "i.json", n=60)), epochs=3,
                                mask_prompt=True, max_new_tokens=8)
    result = finetune(gpt, tok, sft_config, dict(QUIET, lr=3e-3), run_dir=tmp_path / "sft", say=_silent)
    losses = [e["val_loss"] for e in result.history]
    assert losses[-1] < losses[0]
    responses = json.loads((tmp_path / "sft" / "test-responses.json").read_text())
    assert len(responses) == 6 and all("model_response" in r and "_where" not in r for r in responses)

    gpt, tok = load_language_model(tmp_path / "sft")
    dpo_config = FinetuneConfig("dpo", str(write_instructions(tmp_path / "p.json", n=60, preference=True)),
                                epochs=2, beta=0.5)
    result = finetune(gpt, tok, dpo_config, dict(QUIET, lr=3e-3), run_dir=tmp_path / "dpo", say=_silent)
    first, last = result.history[0], result.history[-1]
    assert first["reward_acc"] == 0.5 and first["margin"] == 0.0
    assert last["margin"] > 0 and last["reward_acc"] > 0.5
    assert {"chosen_reward", "rejected_reward"} <= set(last)


def test_a_record_whose_prompt_fills_the_context_is_left_out_and_said_so(tmp_path):
    # docs/finetuning.md: with --truncate, an SFT record whose prompt alone fills the context is left out, and said so
    base = make_base_run(tmp_path / "base", context_length=192)
    records = json.loads(write_instructions(tmp_path / "i.json", n=20).read_text())
    records.insert(5, {"instruction": "i" * 300, "input": "", "output": "o"})
    (tmp_path / "i.json").write_text(json.dumps(records), encoding="utf-8")
    said = []
    gpt, tok = load_language_model(base)
    config = FinetuneConfig("sft", str(tmp_path / "i.json"), epochs=1, truncate=True, max_new_tokens=1)
    finetune(gpt, tok, config, dict(QUIET), run_dir=tmp_path / "run", say=said.append)
    assert any("1 record(s) left out: their prompt alone fills the context of 192" in m for m in said), said
    assert sum(json.loads((tmp_path / "run" / "finetune.json").read_text())["split_sizes"].values()) == 20


def test_read_end_pads_every_batch_to_the_longest_training_text(tmp_path):
    """docs/finetuning.md: --read end pads every text to the longest training text (the book's way); the
    default pads each batch to its own longest text."""
    from minillm.finetune.run import prepare_data  # noqa: PLC0415
    from minillm.tokenizer import BPETokenizer  # noqa: PLC0415

    path = tmp_path / "s.tsv"                                                     # texts of 1 .. 30 bytes
    path.write_text("".join(f"{'spam' if k % 2 else 'ham'}\tx{'y' * (k - 1)}\n" for k in range(1, 31)))
    tokenizer = BPETokenizer.bytes(special_tokens=["<|endoftext|>"])              # one id per byte
    seed = 124                                                                   # the 30-byte text is not training
    end, extra = prepare_data(FinetuneConfig("classify", str(path), read="end", split_seed=seed), tokenizer, 48)
    last, _ = prepare_data(FinetuneConfig("classify", str(path), split_seed=seed), tokenizer, 48)
    train_lengths = [len(ids) for ids, _ in end.split("train")]
    longest = max(train_lengths)
    assert len(set(train_lengths)) == len(train_lengths) == 21 and longest < 30
    assert extra["padded_length"] == longest
    for split in ("train", "val", "test"):
        for ids, lengths, _ in end.iter_batches(split, 4):
            assert ids.shape[1] == longest
        for ids, lengths, _ in last.iter_batches(split, 4):
            assert ids.shape[1] == lengths.max()


def test_a_classifier_run_is_not_a_language_model(tmp_path):
    base = make_base_run(tmp_path / "base")
    gpt, tok = load_language_model(base)
    finetune(gpt, tok, FinetuneConfig("classify", str(write_spam_like(tmp_path / "s.tsv", n=30)), epochs=1),
             dict(QUIET), run_dir=tmp_path / "run", say=_silent)
    with pytest.raises(ValueError, match="classifier run"):
        load_language_model(tmp_path / "run")
    with pytest.raises(ValueError, match="already holds a run"):
        finetune(gpt, tok, FinetuneConfig("classify", str(tmp_path / "s.tsv")), dict(QUIET),
                 run_dir=tmp_path / "run", say=_silent)


def test_a_lora_sft_run_loads_as_a_plain_gpt_with_the_adapters_merged(tmp_path):
    base = make_base_run(tmp_path / "base", context_length=192)
    gpt, tok = load_language_model(base)
    config = FinetuneConfig("sft", str(write_instructions(tmp_path / "i.json", n=30)), epochs=1, lora_rank=2,
                            lora_alpha=4, max_new_tokens=2)
    finetune(gpt, tok, config, dict(QUIET, lr=1e-2), run_dir=tmp_path / "sft", say=_silent)
    adapted, _, _ = load_finetuned(tmp_path / "sft")
    plain, _ = load_language_model(tmp_path / "sft")
    assert lora_layers(adapted) and not lora_layers(plain)
    ids = np.array([[66, 101, 108, 111, 119]])
    with mm.no_grad():
        np.testing.assert_allclose(plain(ids).numpy(), adapted(ids).numpy(), rtol=1e-4, atol=1e-5)
        assert not np.allclose(plain(ids).numpy(), load_language_model(base)[0](ids).numpy())   # it trained


def test_the_defaults_the_help_states_are_the_ones_a_run_uses():
    """`minillm finetune ... --help` states defaults the run takes from FinetuneConfig (the CLI passes None
    through); docs/finetuning.md: --split-seed defaults to 123. A default changed in one place shows here."""
    import argparse  # noqa: PLC0415
    import dataclasses  # noqa: PLC0415
    import re  # noqa: PLC0415

    from minillm.cli import build_parser  # noqa: PLC0415
    from minillm.commands.finetune import TASK_DEFAULTS  # noqa: PLC0415

    def commands(parser):
        (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return action.choices

    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    assert defaults["split_seed"] == 123
    checked = 0
    for task, parser in commands(commands(build_parser())["finetune"]).items():
        for action in parser._actions:
            stated = re.search(r"default: ([^,)]+)", action.help or "")
            if action.dest not in defaults or action.default is not None or not stated:
                continue
            used = TASK_DEFAULTS[task][1] if action.dest == "epochs" else defaults[action.dest]
            assert float(stated.group(1)) == used, (task, action.dest, stated.group(1), used)
            checked += 1
    assert checked == 3 * 5 + 1 + 1                     # split seed, LoRA's three, epochs; max-new-tokens; beta
