"""A tiny 'minillm train'-style run directory and small data files, for the fine-tuning tests."""

import json

import numpy as np

import minillm as mm
from minillm.models import GPT, GPTConfig
from minillm.tokenizer import BPETokenizer
from minillm.train.checkpoint import save_checkpoint


def make_base_run(run_dir, context_length=48, seed=0):
    """A randomly initialised tiny GPT saved like 'minillm train' saves one (bytes tokenizer + <|endoftext|>)."""
    mm.manual_seed(seed)
    tokenizer = BPETokenizer.bytes(special_tokens=["<|endoftext|>"])
    config = GPTConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, context_length=context_length,
                                   n_layer=2, d_model=32, n_head=2)
    model = GPT(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(run_dir / "tokenizer.json")
    save_checkpoint(run_dir, model=model, step=0, model_config=config.to_dict(),
                    tokenizer={"spec": "bytes", "file": "tokenizer.json"})
    return run_dir


def write_spam_like(path, n=60, seed=0):
    """label<TAB>text lines whose label a model can learn: 'spam' texts hold the letter z, 'ham' ones do not."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        spam = i % 3 == 0
        letters = "abcdefgh"
        body = "".join(rng.choice(list(letters), size=int(rng.integers(3, 9))))
        text = body + ("z" if spam else letters[int(rng.integers(0, 8))])
        lines.append(f"{'spam' if spam else 'ham'}\t{text}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_instructions(path, n=40, preference=False):
    records = []
    for i in range(n):
        record = {"instruction": f"Say {i % 7}.", "input": "" if i % 2 else "now", "output": f"{i % 7} ok"}
        if preference:
            record.update(chosen=f"{i % 7} ok", rejected=f"no {i % 7}!")
        records.append(record)
    path.write_text(json.dumps(records), encoding="utf-8")
    return path
