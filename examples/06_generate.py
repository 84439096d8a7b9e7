"""Example 6: generation — greedy, temperature, top-k, top-p, and the KV cache.

With no arguments it uses a small random GPT (the text is noise, the
mechanics are real): it checks that cached and uncached generation agree,
times both, shows how each sampling rule reshapes one next-token distribution,
and stops a batch at an end-of-text token. With ``--run RUN_DIR`` (a run of
``minillm train``, or example 5's runs/shakespeare) it samples real text
from that model as well.

    python examples/06_generate.py
    python examples/06_generate.py --run runs/pydoc --prompt "The "
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import minillm as mm  # noqa: E402
from minillm.commands.argtypes import positive_int  # noqa: E402
from minillm.generate import generate, sampling_probs  # noqa: E402
from minillm.models import GPT, GPTConfig  # noqa: E402


def cache_demo(model: GPT, new_tokens: int) -> float:
    """Generate with and without the KV cache: same tokens, different cost. Returns the speed-up."""
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, 8))
    timings, outputs = {}, {}
    for use_cache in (True, False):
        start = time.perf_counter()
        outputs[use_cache] = generate(model, prompt, new_tokens, temperature=0, use_cache=use_cache)
        timings[use_cache] = time.perf_counter() - start
    assert np.array_equal(outputs[True], outputs[False]), "the cache must not change greedy tokens"
    speedup = timings[False] / timings[True]
    print(f"{new_tokens} tokens, greedy: {new_tokens / timings[True]:.0f} tokens/s with the KV cache, "
          f"{new_tokens / timings[False]:.0f} without ({speedup:.1f}x); identical tokens")
    return speedup


def sampling_demo(model: GPT) -> None:
    """One next-token distribution, as each sampling rule reshapes it."""
    with mm.no_grad():
        logits = model.eval()(np.array([[1, 2, 3]])).data[:, -1]          # (1, V)
    for label, kwargs in [("temperature 1", {}), ("temperature 0.5", dict(temperature=0.5)),
                          ("top-k 5", dict(top_k=5)), ("top-p 0.5", dict(top_p=0.5))]:
        probs = sampling_probs(logits, **kwargs)[0]
        top = np.argsort(-probs)[:5]
        shown = ", ".join(f"{i}:{probs[i]:.3f}" for i in top)
        print(f"  {label:16s} {np.count_nonzero(probs):4d} tokens possible; top 5 {shown}")


def eos_demo(model: GPT) -> None:
    """A batch of two prompts where a row stops once it produces the 'eos' token."""
    prompts = np.array([[5, 6, 7], [9, 9, 9]])
    free = generate(model, prompts, 10, top_k=20, seed=1)
    eos = int(free[0, 6])                                    # pretend row 0's 4th new token ends a text
    out = generate(model, prompts, 10, top_k=20, seed=1, eos_id=eos)
    print(f"  without eos: {free.tolist()}")
    print(f"  eos_id={eos}:  {out.tolist()}")
    print("  (a stopped row pads with eos; the loop ends once every row has stopped)")


def run_demo(model: GPT, tokenizer, prompt: str, new_tokens: int) -> None:
    """Greedy, then temperature with top-k, then top-p, from a trained run's model."""
    ids = tokenizer.encode(prompt, allowed_special="all") or [0]      # as minillm generate: <|endoftext|> is one token
    for kwargs in (dict(temperature=0), dict(temperature=0.8, top_k=50, seed=0), dict(top_p=0.9, seed=0)):
        out = generate(model, [ids], new_tokens, **kwargs)              # past the context, the window slides
        print(f"--- {kwargs} ---\n{tokenizer.decode(out[0].tolist())}")


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a run directory of `minillm train` to sample from")
    parser.add_argument("--prompt", default="The ")
    parser.add_argument("--new-tokens", type=positive_int, default=48)
    args = parser.parse_args(argv)
    if args.run:                                   # a wrong run directory is said before any work
        from minillm.train.run import load_run

        try:
            trained = load_run(args.run)
        except (OSError, ValueError, RuntimeError) as error:   # missing, not a run, corrupt checkpoint
            parser.error(f"--run {args.run}: {error}")

    mm.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, context_length=128, n_layer=4, n_head=4, d_model=128))
    speedup = cache_demo(model, args.new_tokens)
    print("sampling rules on one distribution:")
    sampling_demo(model)
    a = generate(model, [[1, 2, 3]], 12, temperature=0.8, top_k=50, seed=42)
    b = generate(model, [[1, 2, 3]], 12, temperature=0.8, top_k=50, seed=42)
    assert np.array_equal(a, b)
    print(f"seed 42 twice: {a[0, 3:].tolist()} == {b[0, 3:].tolist()}")
    print("end of text:")
    eos_demo(model)
    if args.run:
        run_demo(*trained, args.prompt, args.new_tokens)
    return speedup


if __name__ == "__main__":
    main()
