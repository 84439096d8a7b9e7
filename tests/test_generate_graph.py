"""CUDA-graph decoding (minillm/generate.py, kernels/generate.py): the same tokens as the uncaptured
path, the window sliding past the context, reuse of the capture, and its limits."""

import numpy as np
import pytest

import minillm as mm
from minillm.generate import generate, graph_decoder
from minillm.models import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=97, context_length=48, n_layer=2, n_head=4, d_model=32, dropout=0.0)


def model_on(device):
    mm.manual_seed(0)
    return GPT(CONFIG, device=device).eval()


def test_cuda_graph_needs_a_gpu_model():
    with pytest.raises(ValueError, match="cuda_graph=True"):
        generate(model_on("cpu"), np.array([[1, 2]]), 3, temperature=0, cuda_graph=True)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graph_decoding_gives_the_uncaptured_tokens(batch, precision, gpu):
    """Greedy tokens, 90 of them from a 5-token prompt: past the 48-position context, so the
    window slides and the static cache is re-prefilled twice along the way."""
    model = model_on(gpu)
    prompt = np.random.default_rng(batch).integers(0, 97, (batch, 5))
    with mm.precision.use_precision(precision):
        plain = generate(model, prompt, 90, temperature=0, cuda_graph=False)
        graphed = generate(model, prompt, 90, temperature=0, cuda_graph=True)
    np.testing.assert_array_equal(graphed, plain)


def test_graph_step_logits_equal_the_model_step(gpu):
    """One replay against one cached model step at the same position: float32, same products;
    only the attention's summation order differs (1e-5 relative is generous)."""
    model = model_on(gpu)
    prompt = np.array([[3, 1, 4, 1, 5, 9]])
    decoder = graph_decoder(model, 1)
    with mm.no_grad():
        cache = model.new_kv_cache(1, CONFIG.context_length)
        model(prompt, cache=cache)
        expected = mm.backend.to_numpy(model(np.array([[2]]), cache=cache).data[:, -1])
        decoder.cache.reset()
        model(prompt, cache=decoder.cache)
        got = mm.backend.to_numpy(decoder.step(np.array([2]), 6))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_capture_is_reused_until_the_weight_arrays_are_replaced(gpu):
    """In-place weight changes (optimizer steps, load_state_dict) are read by every replay;
    a parameter given a new array gets a new capture."""
    model = model_on(gpu)
    first = graph_decoder(model, 2)
    assert graph_decoder(model, 2) is first                      # once per batch size
    assert graph_decoder(model, 1) is not first
    prompt = np.array([[5, 6, 7], [8, 9, 10]])
    before = generate(model, prompt, 6, temperature=0)
    model.load_state_dict({k: -v for k, v in model.state_dict().items()})      # in place
    assert graph_decoder(model, 2) is first
    np.testing.assert_array_equal(generate(model, prompt, 6, temperature=0),
                                  generate(model, prompt, 6, temperature=0, cuda_graph=False))
    assert not np.array_equal(generate(model, prompt, 6, temperature=0), before)
    model.wte.weight.data = model.wte.weight.data.copy()                       # a new array
    assert graph_decoder(model, 2) is not first
