"""GRIT losses as pure functions: contrastive (query -> passage) and next-token cross-entropy
(the LM head applied in shard-aligned chunks, as training and evaluation use it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from grit_jax.config import ModelConfig
from grit_jax.model import logits_fn
from grit_jax.sharding import batch_shards

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


def shard_chunks(a, chunks: int, shards: int):
    """(N, ...) -> (chunks, N/chunks, ...) where chunk j holds the j-th slice of every shard's
    block of rows: a batch-sharded array stays sharded along dim 1, with no data movement."""
    n = a.shape[0]
    return a.reshape((shards, chunks, n // (shards * chunks)) + a.shape[1:]).swapaxes(0, 1).reshape(
        (chunks, n // chunks) + a.shape[1:])


def unshard_chunks(a, shards: int):
    """Inverse of shard_chunks: (chunks, M, ...) -> (chunks * M, ...) in the original row order."""
    chunks, m = a.shape[:2]
    return a.reshape((chunks, shards, m // shards) + a.shape[2:]).swapaxes(0, 1).reshape(
        (chunks * m,) + a.shape[2:])


def token_ce(params, config: ModelConfig, hidden, ids, chunk: int):
    """Per-token next-token CE (B, T-1) with the LM head applied ``chunk`` tokens at a time.

    With several chunks the chunk body is rematerialised, so the full (B, T, vocab) logits
    never exist at once. Each chunk takes an equal share of every batch shard's own tokens (see
    shard_chunks), so no device computes logits for another's tokens.
    """
    b, t, e = hidden.shape
    shards = batch_shards()
    shards = shards if b % shards == 0 else 1
    local = b * (t - 1) // shards  # tokens per shard
    chunks = -(-local // max(1, chunk // shards))
    per = -(-local // chunks)  # as even as possible: pads fewer than `chunks` tokens per shard
    pad = chunks * per - local
    h = jnp.pad(hidden[:, :-1].reshape(shards, local, e), ((0, 0), (0, pad), (0, 0)))
    labels = jnp.pad(ids[:, 1:].reshape(shards, local), ((0, 0), (0, pad)))
    h = shard_chunks(h.reshape(-1, e), chunks, shards)
    labels = shard_chunks(labels.reshape(-1), chunks, shards)

    def one(args):
        hc, lc_ = args
        logits = logits_fn(params, config, hc[None])[0]
        # logsumexp - the label's logit; the one-hot product keeps the backward one fused
        # elementwise pass (softmax - one_hot) instead of a scatter into a zero (tokens, vocab).
        picked = jnp.sum(logits * jax.nn.one_hot(lc_, logits.shape[-1], dtype=logits.dtype), -1)
        return jax.nn.logsumexp(logits, axis=-1) - picked

    if chunks > 1:  # one chunk: the logits are needed once anyway, recomputing them is waste
        one = jax.checkpoint(one)
    ce = unshard_chunks(jax.lax.map(one, (h, labels)), shards).reshape(shards, -1)[:, :local]
    return ce.reshape(b, t - 1)
