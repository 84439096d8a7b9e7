"""Parity with Hugging Face ``transformers``: small random Llama, Qwen3 and GPT-2 models, both ways.

For each model: ``transformers`` builds it at random (GQA with 4 query and 2
key/value heads; Llama untied with Llama 3 rope scaling, Qwen3 with q/k norm and
a tied head) and saves it (``save_pretrained``, safetensors); minillm loads
the directory with ``minillm.weights.load_hf`` and the script prints

    logits      max |minillm − transformers| over a (2, 24) batch (fp32; and fp64 for Llama/Qwen3,
                where transformers still forms the rotary angles in fp32, hence ~1e-6, not ~1e-12)
    bf16 file   the same for a bfloat16 checkpoint (against transformers loading that file in fp32)
    greedy      whether 20 greedy tokens are identical (transformers' generate vs minillm's)
    cache       max |cached − uncached| logits in minillm (prefill 16, then 8 single steps)
    save_hf     max |logits| difference after minillm's save_hf (single file and sharded) is
                loaded back by transformers

and exits non-zero if any logits differ by more than 1e-4 or greedy tokens differ.
Needs torch and transformers (not minillm dependencies): run on a machine that has them,

    PYTHONPATH=. python3 benchmarks/hf_parity.py
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import numpy as np

import minillm as mm
from minillm.weights import load_hf, save_hf

TOLERANCE = 1e-4
PROMPT_LEN, NEW_TOKENS, VOCAB = 24, 20, 101


# ------------------------------------------------------------------ the minillm side (no torch needed)


def minillm_checks(directory, ids: np.ndarray, dtype=np.float32) -> dict:
    """Load ``directory`` with minillm: logits of ``ids``, greedy continuation of ids[:1], cache vs no cache."""
    model = load_hf(directory, dtype=dtype)
    with mm.no_grad():
        logits = model(ids).numpy()
        cache = model.new_kv_cache(ids.shape[0], ids.shape[1])
        split = ids.shape[1] - 8
        steps = [model(ids[:, :split], cache=cache).numpy()]
        steps += [model(ids[:, t:t + 1], cache=cache).numpy() for t in range(split, ids.shape[1])]
    cached = np.concatenate(steps, axis=1)
    greedy = model.generate(ids[:1], NEW_TOKENS, temperature=0.0, use_cache=True)[0, ids.shape[1]:]
    greedy_uncached = model.generate(ids[:1], NEW_TOKENS, temperature=0.0, use_cache=False)[0, ids.shape[1]:]
    return {"model": model, "logits": logits, "cache_diff": float(np.abs(cached - logits).max()),
            "greedy": greedy, "greedy_cache_equal": bool((greedy == greedy_uncached).all())}


# ------------------------------------------------------------------ the transformers side


def hf_models():
    import torch  # noqa: PLC0415
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: PLC0415
    from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: PLC0415

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)
    llama = LlamaForCausalLM(LlamaConfig(
        **common, intermediate_size=112, head_dim=16, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None))
    qwen3 = Qwen3ForCausalLM(Qwen3Config(
        **common, intermediate_size=96, head_dim=24, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                      initializer_range=0.2, bos_token_id=None, eos_token_id=None))
    with torch.no_grad():                           # norms away from their init (ones), so they matter
        for model in (llama, qwen3, gpt2):
            for name, param in model.named_parameters():
                if "norm" in name or "ln_" in name:
                    param.add_(0.2 * torch.randn_like(param))
    return {"llama": llama.eval(), "qwen3": qwen3.eval(), "gpt2": gpt2.eval()}


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch  # noqa: PLC0415

    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.double().numpy()


def hf_greedy(model, ids: np.ndarray) -> np.ndarray:
    import torch  # noqa: PLC0415

    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids[:1]), attention_mask=torch.ones_like(torch.from_numpy(ids[:1])),
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[0, ids.shape[1]:].numpy()


def hf_load(directory):
    """transformers' AutoModelForCausalLM from ``directory``, in float32 (``dtype``; ``torch_dtype`` before 4.56)."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32)
    return model.eval()


def check(name, hf_model, work: Path, ids: np.ndarray) -> list[str]:
    import torch  # noqa: PLC0415

    failures, rows = [], []
    directory = work / name
    hf_model.save_pretrained(directory, safe_serialization=True)
    reference = hf_logits(hf_model, ids)
    ours = minillm_checks(directory, ids)
    diff = float(np.abs(ours["logits"] - reference).max())
    rows.append(("logits fp32", diff, diff <= TOLERANCE))
    if name != "gpt2":
        hf64 = hf_logits(copy.deepcopy(hf_model).double(), ids)
        diff64 = float(np.abs(minillm_checks(directory, ids, dtype=np.float64)["logits"] - hf64).max())
        rows.append(("logits fp64", diff64, diff64 <= TOLERANCE))
    greedy_hf = hf_greedy(hf_model, ids)
    rows.append(("greedy identical", int((greedy_hf != ours["greedy"]).sum()), bool((greedy_hf == ours["greedy"]).all())))
    rows.append(("greedy cached == uncached", 0 if ours["greedy_cache_equal"] else 1, ours["greedy_cache_equal"]))
    rows.append(("cached vs uncached logits", ours["cache_diff"], ours["cache_diff"] <= TOLERANCE))
    # a bfloat16 checkpoint: minillm widens it to fp32; transformers loads the same file in fp32
    bf16_dir = work / f"{name}-bf16"
    copy.deepcopy(hf_model).to(torch.bfloat16).save_pretrained(bf16_dir, safe_serialization=True)
    bf16_diff = float(np.abs(minillm_checks(bf16_dir, ids)["logits"] - hf_logits(hf_load(bf16_dir), ids)).max())
    rows.append(("bf16 file logits", bf16_diff, bf16_diff <= TOLERANCE))
    for label, shard in (("save_hf -> transformers", None), ("save_hf sharded -> transformers", 20_000)):
        out = work / f"{name}-out-{shard}"
        save_hf(ours["model"], out, max_shard_bytes=shard)
        again = hf_load(out)
        round_trip = float(np.abs(hf_logits(again, ids) - reference).max())
        rows.append((label, round_trip, round_trip <= TOLERANCE))
    print(f"\n{name} ({type(hf_model).__name__}, {sum(p.numel() for p in hf_model.parameters()):,} parameters, "
          f"max |logit| {np.abs(reference).max():.2f})")
    for label, value, ok in rows:
        shown = f"{value:.3e}" if isinstance(value, float) else str(value)
        print(f"  {label:34s} {shown:>10s}  {'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append(f"{name}: {label} = {shown}")
    return failures


def main() -> int:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}")
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, PROMPT_LEN))
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in hf_models().items():
            failures += check(name, model, Path(tmp), ids)
    print("\nall checks passed" if not failures else "\nFAILED:\n  " + "\n  ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
