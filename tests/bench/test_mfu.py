"""MFU bookkeeping of ``minillm bench train``: FLOPs per token worked out by hand for GPT-2 small."""

from minillm.bench.train import GPU_PEAK_TFLOPS, flops_per_token
from minillm.models import GPT, GPTConfig


def test_flops_per_token_of_gpt2_small():
    config = GPTConfig.from_preset("gpt2-124m")
    parameters = GPT(config).num_parameters()
    assert parameters == 124_439_808                              # GPT-2 small, tied head
    # 6 N with N = parameters minus the 1024 x 768 position table, plus 12 L d T
    expected = 6 * (124_439_808 - 1024 * 768) + 12 * 12 * 768 * 1024
    assert flops_per_token(config, parameters) == expected == 855_166_464   # 741,920,256 + 113,246,208


def test_peaks_are_the_dense_datasheet_figures():
    for gpu in ("H100", "H200"):
        peaks = GPU_PEAK_TFLOPS[gpu]
        assert peaks["bf16"] == peaks["fp16"] == 2 * peaks["tf32"] == 989.4     # dense, no sparsity
        assert peaks["fp32"] == 66.9
