"""GRIT losses as pure functions: contrastive (query -> passage) and next-token cross-entropy."""

from __future__ import annotations

import jax
import jax.numpy as jnp

AGGREGATIONS = ("mixed", "token", "sample")
MODES = ("unified", "embedding", "generative")  # which of GRIT's two losses a step sums


def contrastive_loss(q_reps: jnp.ndarray, p_reps: jnp.ndarray, temperature: float = 0.02):
    """InfoNCE over every passage of the (global) batch; query i's positive is passage i*G.

    q_reps (Q, E), p_reps (Q*G, E), both already normalised if the model normalises. One
    direction (query -> passage), mean over queries, as GRIT.
    """
    dt = jnp.promote_types(jnp.result_type(q_reps, p_reps), jnp.float32)  # f64 stays f64
    q, p = q_reps.astype(dt), p_reps.astype(dt)
    group = p.shape[0] // q.shape[0]
    scores = (q @ p.T) / temperature
    target = jnp.arange(q.shape[0]) * group
    logp = jax.nn.log_softmax(scores, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, target[:, None], axis=1))


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
