"""Pooling of hidden states into one embedding per sequence, in float32 (float64 for float64
models) whatever the compute dtype."""

from __future__ import annotations

import jax.numpy as jnp

POOLING_METHODS = ("mean", "weightedmean", "lasttoken", "cls")


def pool(hidden: jnp.ndarray, mask: jnp.ndarray, method: str = "mean") -> jnp.ndarray:
    """Pool hidden (B, T, E) over the tokens where mask (B, T) is 1.

    mean: average of masked tokens. weightedmean: weights 1, 2, 3, ... over the masked tokens
    (mask * cumsum(mask)). lasttoken: the last masked token. cls: the first token (BOS).
    A row with no masked token pools to zeros rather than NaN.
    """
    if method not in POOLING_METHODS:
        raise ValueError(f"pooling method must be one of {POOLING_METHODS}, got {method!r}")
    dt = jnp.promote_types(hidden.dtype, jnp.float32)  # bf16 -> f32; f64 stays f64
    h = hidden.astype(dt)
    m = mask.astype(dt)
    if method == "cls":
        return h[:, 0]
    if method == "lasttoken":
        t = m.shape[1]
        last = t - 1 - jnp.argmax(m[:, ::-1], axis=1)
        picked = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
        return picked * (m.sum(1, keepdims=True) > 0)
    if method == "weightedmean":
        m = m * jnp.cumsum(m, axis=1)
    total = jnp.einsum("bte,bt->be", h, m)
    return total / jnp.maximum(m.sum(1, keepdims=True), 1.0)


def l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
    """x / max(||x||, eps) along the last axis (torch.nn.functional.normalize semantics)."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, eps)
