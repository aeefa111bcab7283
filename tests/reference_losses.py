"""Plain (unchunked) LM-loss references the tests hold training's chunked loss and weights to."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from grit_jax.losses import AGGREGATIONS


def token_cross_entropy(logits: jnp.ndarray, ids: jnp.ndarray) -> jnp.ndarray:
    """Per-token CE of predicting ids[:, t+1] from logits[:, t]: shape (B, T-1), float32
    (float64 for float64 logits)."""
    dt = jnp.promote_types(logits.dtype, jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(dt), axis=-1)
    return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]


def aggregate(ce: jnp.ndarray, mask: jnp.ndarray, how: str = "mixed", sub_batch: int = 32):
    """Reduce per-token CE (B, T') over the tokens where mask (B, T') is 1.

    token:  sum over tokens / batch size (every token weighs the same; GritLM-8x7B).
    mixed:  token mean within each sub-batch of ``sub_batch`` samples, then the mean over
            sub-batches (what per-device means + gradient averaging give; GritLM-7B).
    sample: token mean within each sample, then the mean over samples.
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"generative loss aggregation must be one of {AGGREGATIONS}, got {how!r}")
    m = mask.astype(jnp.promote_types(ce.dtype, jnp.float32))
    per_sample, count = jnp.sum(ce * m, axis=1), jnp.sum(m, axis=1)
    b = ce.shape[0]
    if how == "token":
        return jnp.sum(per_sample) / b
    if how == "sample":
        return jnp.mean(per_sample / jnp.maximum(count, 1.0))
    n = -(-b // sub_batch)  # sub-batches; the last may be smaller
    groups = jnp.arange(b) // sub_batch
    sums = jax.ops.segment_sum(per_sample, groups, num_segments=n)
    counts = jax.ops.segment_sum(count, groups, num_segments=n)
    return jnp.mean(sums / jnp.maximum(counts, 1.0))


def generative_loss(logits, ids, loss_mask, how: str = "mixed", sub_batch: int = 32):
    """Shift-by-one LM loss over tokens whose *label* position has loss_mask 1."""
    return aggregate(token_cross_entropy(logits, ids), loss_mask[:, 1:], how, sub_batch)
