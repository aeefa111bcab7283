"""An independent float64 NumPy forward pass of the decoder, for checking the Flax model.

Written from the architecture's definition (no shared code with grit_jax.model): explicit
per-head loops, masks built element by element, RoPE as rotations of (i, i + d/2) pairs.
"""

import numpy as np


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, pos, inv_freq):
    # x: (T, D); rotate pairs (j, j + D/2) by pos * inv_freq[j]
    half = x.shape[-1] // 2
    ang = pos[:, None] * inv_freq[None, :]
    c, s = np.cos(ang), np.sin(ang)
    a, b = x[:, :half], x[:, half:]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def allowed(i, j, valid, mode, window, prompt=None):
    """May query i attend to key j? (mode: causal / bidirectional / prefix:N = bidirectional
    among the first N tokens, causal after them / prefix = causal, and bidirectional between
    two tokens when every token from one to the other is a prompt token)."""
    if not valid[j]:
        return False
    if mode == "bidirectional":
        return True
    if mode.startswith("prefix:"):
        n = int(mode.split(":")[1])
        return j <= i or (i < n and j < n)
    causal = j <= i and (window is None or i - j < window)
    if mode == "prefix":
        return causal or all(prompt[min(i, j):max(i, j) + 1])
    return causal


def hidden_states(params, cfg, ids, valid, mode, inv_freq, prompt=None):
    """Final-norm hidden states (B, T, E) in float64 (``prompt`` (B, T): mode 'prefix')."""
    p = {k: np.asarray(v, np.float64) for k, v in _flat(params).items()}
    b, t = ids.shape
    d, h, g = cfg.resolved_head_dim, cfg.num_heads, cfg.num_kv_heads
    out = np.zeros((b, t, cfg.hidden_size))
    for r in range(b):
        x = p["embed/embedding"][ids[r]]
        pos = np.arange(t, dtype=np.float64)
        for layer in range(cfg.num_layers):
            L = lambda name: p[name][layer]  # noqa: E731
            y = _rms(x, L("layers/attn_norm/scale"), cfg.rms_norm_eps)
            attn = np.zeros((t, h, d))
            for head in range(h):
                kvh = head // (h // g)
                q = _rope(y @ L("layers/attn/q")[:, head], pos, inv_freq)
                k = _rope(y @ L("layers/attn/k")[:, kvh], pos, inv_freq)
                v = y @ L("layers/attn/v")[:, kvh]
                for i in range(t):
                    keys = [j for j in range(t) if allowed(i, j, valid[r], mode, cfg.sliding_window,
                                                           None if prompt is None else prompt[r])]
                    if not keys:  # a padding query with nothing to see: irrelevant output
                        continue
                    s = np.array([q[i] @ k[j] for j in keys]) / np.sqrt(d)
                    w = np.exp(s - s.max())
                    w /= w.sum()
                    attn[i, head] = sum(wj * v[j] for wj, j in zip(w, keys))
            x = x + np.einsum("thd,hde->te", attn, L("layers/attn/o"))
            y = _rms(x, L("layers/mlp_norm/scale"), cfg.rms_norm_eps)
            gate = y @ L("layers/mlp/gate")
            x = x + ((gate / (1 + np.exp(-gate))) * (y @ L("layers/mlp/up"))) @ L("layers/mlp/down")
        out[r] = _rms(x, p["final_norm/scale"], cfg.rms_norm_eps)
    return out


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "/"))
        else:
            out[key] = v
    return out
