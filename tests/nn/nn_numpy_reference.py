"""Plain-NumPy references for the layers and the whole GPT (float64, no minillm code).

Each function restates the math directly from its definition, so the tests
compare minillm's composition of ops against an independent formula. The GPT
reference reads a ``state_dict`` (name -> array) with GPT-2's names.
"""

import math

import numpy as np


def linear(x, weight, bias=None):
    y = x @ weight.T
    return y if bias is None else y + bias


def layer_norm(x, weight, bias=None, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps) * weight
    return y if bias is None else y + bias


def gelu(x, approximate="tanh"):
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def causal_attention(x, c_attn_w, c_attn_b, c_proj_w, c_proj_b, n_head):
    """x (B, T, C) -> (B, T, C): fused qkv projection, per-head causal softmax attention, output projection."""
    B, T, C = x.shape
    Dh = C // n_head
    qkv = linear(x, c_attn_w, c_attn_b)                         # (B, T, 3C)
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    heads = lambda a: a.reshape(B, T, n_head, Dh).transpose(0, 2, 1, 3)   # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)                      # (B, H, T, Dh)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(Dh)        # (B, H, T, T)
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    scores = np.where(future, -np.inf, scores)
    y = softmax(scores) @ v                                     # (B, H, T, Dh)
    y = y.transpose(0, 2, 1, 3).reshape(B, T, C)
    return linear(y, c_proj_w, c_proj_b)


def _get(sd, name):
    return sd.get(name)


def block(x, sd, prefix, n_head, eps=1e-5, approximate="tanh"):
    """One pre-norm GPT-2 block, parameters read from ``sd`` under ``prefix`` (e.g. "h.0.")."""
    p = lambda name: _get(sd, prefix + name)   # noqa: E731
    h = layer_norm(x, p("ln_1.weight"), p("ln_1.bias"), eps)
    x = x + causal_attention(h, p("attn.c_attn.weight"), p("attn.c_attn.bias"),
                             p("attn.c_proj.weight"), p("attn.c_proj.bias"), n_head)
    h = layer_norm(x, p("ln_2.weight"), p("ln_2.bias"), eps)
    h = gelu(linear(h, p("mlp.c_fc.weight"), p("mlp.c_fc.bias")), approximate)
    return x + linear(h, p("mlp.c_proj.weight"), p("mlp.c_proj.bias"))


def gpt_logits(ids, sd, n_layer, n_head, eps=1e-5, approximate="tanh"):
    """ids (B, T) -> logits (B, T, V) of GPT-2 with a tied head."""
    T = ids.shape[1]
    x = sd["wte.weight"][ids] + sd["wpe.weight"][:T]           # (B, T, C)
    for i in range(n_layer):
        x = block(x, sd, f"h.{i}.", n_head, eps, approximate)
    x = layer_norm(x, sd["ln_f.weight"], _get(sd, "ln_f.bias"), eps)
    return x @ sd["wte.weight"].T                              # (B, T, V)


def cross_entropy(logits, targets, ignore_index=-100):
    """Mean of -log softmax(logits)[target] over targets != ignore_index."""
    z = logits.reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    log_probs = z - z.max(axis=-1, keepdims=True)
    log_probs = log_probs - np.log(np.exp(log_probs).sum(axis=-1, keepdims=True))
    valid = t != ignore_index
    return -log_probs[np.arange(len(t))[valid], t[valid]].mean()


# ------------------------------------------------------------------ Llama / Qwen3 (rotary, RMSNorm, SwiGLU, GQA)

def rms_norm(x, weight, eps):
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * weight


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def inv_freq(dim, theta, scaling):
    freqs = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    if scaling is None:
        return freqs
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for w in freqs:
        wavelen = 2 * math.pi / w
        smooth = (old / wavelen - low) / (high - low)
        out.append(w if wavelen < old / high else w / factor if wavelen > old / low
                   else (1 - smooth) * w / factor + smooth * w)
    return np.array(out)


def llama_logits(ids, sd, cfg):
    """Hugging Face's LlamaForCausalLM / Qwen3ForCausalLM forward, written out with separate projections.

    ``sd`` has minillm's names (c_attn = [q; k; v] rows, c_fc = [gate; up] rows); ``cfg`` a GPTConfig."""
    B, T = ids.shape
    H, Hkv, Dh, C = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_model
    freqs = np.arange(T)[:, None] * inv_freq(Dh, cfg.rope_theta, cfg.rope_scaling)
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb), np.sin(emb)                           # (T, Dh)
    x = sd["wte.weight"][ids]
    for i in range(cfg.n_layer):
        p = lambda name: sd[f"h.{i}.{name}"]                      # noqa: E731
        h = rms_norm(x, p("ln_1.weight"), cfg.layer_norm_eps)
        w = p("attn.c_attn.weight")
        q_proj, k_proj, v_proj = w[:H * Dh], w[H * Dh:(H + Hkv) * Dh], w[(H + Hkv) * Dh:]
        q = (h @ q_proj.T).reshape(B, T, H, Dh)
        k = (h @ k_proj.T).reshape(B, T, Hkv, Dh)
        v = (h @ v_proj.T).reshape(B, T, Hkv, Dh).transpose(0, 2, 1, 3)
        if cfg.qk_norm:
            q, k = rms_norm(q, p("attn.q_norm.weight"), cfg.layer_norm_eps), rms_norm(k, p("attn.k_norm.weight"),
                                                                                    cfg.layer_norm_eps)
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = np.repeat(k, H // Hkv, axis=1), np.repeat(v, H // Hkv, axis=1)   # repeat_kv
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(Dh)
        scores = np.where(np.triu(np.ones((T, T), bool), 1), -np.inf, scores)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        y = (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, H * Dh)
        x = x + y @ p("attn.c_proj.weight").T
        h = rms_norm(x, p("ln_2.weight"), cfg.layer_norm_eps)
        hidden = p("mlp.c_proj.weight").shape[1]
        gate, up = h @ p("mlp.c_fc.weight")[:hidden].T, h @ p("mlp.c_fc.weight")[hidden:].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ p("mlp.c_proj.weight").T
    x = rms_norm(x, sd["ln_f.weight"], cfg.layer_norm_eps)
    return x @ sd["wte.weight" if cfg.tie_embeddings else "lm_head.weight"].T
