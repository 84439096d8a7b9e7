"""Generation past the context window: the cached loop (re-prefilling when the window slides) gives,
token for token, what a slow reference gets by recomputing each window from scratch."""

import numpy as np
import pytest

import minillm as mm
from minillm.generate import default_window_keep, generate, sample_next
from minillm.models import GPT, GPTConfig

C = 8          # context length: 3 * C new tokens slide the window several times


def make_model(**overrides):
    """A small model with weights large enough that its logits are far from uniform (no near-ties)."""
    mm.manual_seed(0)
    model = GPT(GPTConfig(**{**dict(vocab_size=61, context_length=C, n_layer=2, n_head=2, d_model=16),
                             **overrides})).eval()
    rng = np.random.default_rng(1)
    for param in model.parameters():
        param.data[...] = rng.standard_normal(param.shape).astype(np.float32) * 0.3
    return model


def reference(model, prompt, new_tokens, keep, temperature=0.0, top_k=None, seed=None):
    """Written from the rule in the docstring, no cache: the window [s, n) that predicts token n starts
    at 0 (or at the last C tokens of a long prompt) and, whenever it would hold C + 1 tokens, jumps to
    the last ``keep``; the model is run from scratch on the window at every step."""
    rng = np.random.default_rng(seed) if temperature else None
    seq = list(prompt)
    s = max(0, len(seq) - C)
    for _ in range(new_tokens):
        n = len(seq)
        if n - s > C:
            s = n - keep
        with mm.no_grad():
            logits = model(np.asarray([seq[s:n]])).data[:, -1]          # positions 0 .. n - s - 1
        seq.append(int(sample_next(logits, temperature, top_k, None, rng)[0]))
    return seq


@pytest.mark.parametrize("keep", [None, C, 1, 5])
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_k=20, seed=5)],
                         ids=["greedy", "seeded"])
def test_three_contexts_of_new_tokens_match_the_from_scratch_windows(keep, sampling, device):
    model = make_model().to(device)            # on a GPU, the cached path replays CUDA graphs between slides
    prompt = [3, 14, 15]
    expected = reference(model, prompt, 3 * C, keep or default_window_keep(C), **sampling)
    for use_cache in (True, False):
        out = generate(model, [prompt], 3 * C, use_cache=use_cache, window_keep=keep, **sampling)
        assert out.shape == (1, len(prompt) + 3 * C)
        assert out[0].tolist() == expected, f"use_cache={use_cache}"


def test_rotary_model_and_a_prompt_longer_than_the_context():
    model = make_model(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    prompt = list(range(1, 2 * C + 2))                                  # 2C + 1 tokens: starts from the last C
    expected = reference(model, prompt, 3 * C, default_window_keep(C), temperature=1.0, seed=3)
    assert generate(model, [prompt], 3 * C, temperature=1.0, seed=3)[0].tolist() == expected


@pytest.mark.parametrize("keep", [6, 3])
def test_a_slide_costs_one_prefill_of_keep_tokens_every_c_minus_keep_plus_one_tokens(keep, monkeypatch):
    """docs/generation.md: with the cache, the window costs one prefill of ``keep`` tokens every C - keep + 1
    new tokens (the kept window, then C - keep steps that grow it back to C); every other step runs one
    position."""
    model = make_model()
    widths = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda ids, *a, **k: widths.append(np.shape(ids)[-1]) or forward(ids, *a, **k))
    prompt, new = [3, 14, 15], 3 * C
    generate(model, [prompt], new, temperature=0, window_keep=keep)
    # the rule by hand: token n (n = 3 .. 3 + new - 1) is predicted from the window [s, n); s jumps to n - keep
    # when the window would hold C + 1 tokens; the last token is never fed back
    s, expected = 0, [len(prompt)]
    for n in range(len(prompt) + 1, len(prompt) + new):
        if n - s > C:
            s = n - keep
            expected.append(keep)
        else:
            expected.append(1)
    assert widths == expected
    slides = [i for i, width in enumerate(widths) if i and width == keep]
    assert len(slides) > 2 and set(np.diff(slides)) == {C - keep + 1}


def test_default_window_keeps_three_quarters_of_the_context():
    # docs/generation.md: window_keep defaults to 3C/4 (GPT-2: 768 of 1024), at least one token
    assert [default_window_keep(c) for c in (1024, 64, 8, 1)] == [768, 48, 6, 1]


def test_the_window_really_slides():
    # a reference that never slides (always the whole sequence) cannot even run past C: the windows
    # above are not a quiet crop of something else, and within the context nothing changes
    model = make_model()
    short = generate(model, [[1, 2]], C - 2, temperature=0)[0].tolist()
    assert short == reference(model, [1, 2], C - 2, keep=1)                # no slide happens before C
    with pytest.raises(ValueError, match="exceeds"):
        model(np.arange(C + 1)[None] % 61)
    with pytest.raises(ValueError, match="window_keep must be an integer in"):
        generate(model, [[1]], 3, window_keep=C + 1)
