"""Held-out generative loss: mean next-token cross-entropy over the loss-masked tokens."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from grit_jax.data import formats
from grit_jax.model import forward
from grit_jax.losses import token_ce


@partial(jax.jit, static_argnames=("config", "chunk"))
def masked_nll(params, config, ids, valid, loss_mask, chunk: int = 1024):
    """(sum of token NLL, number of tokens) over positions whose target carries loss."""
    hidden = forward(params, config, ids, valid, mode="causal").hidden
    ce = token_ce(params, config, hidden, ids, chunk)
    mask = (loss_mask[:, 1:] * valid[:, 1:]).astype(jnp.float32)
    return (ce * mask).sum(), mask.sum()


def heldout_loss(model, encoded: Sequence[formats.Encoded], *, batch_size: int = 8,
                 max_length: int | None = None) -> dict:
    """Token-level mean loss and perplexity of a GritLM on encoded samples (ids + loss mask).

    Samples longer than ``max_length`` (default: min(2048, the model's positions)) are cut at
    the end; how many is reported.
    """
    if not encoded:
        raise ValueError("heldout_loss: no samples")
    limit = model.config.max_position_embeddings
    if max_length is None:
        max_length = min(2048, limit)
    elif not 1 <= max_length <= limit:
        raise ValueError(f"max_length={max_length}: must be in [1, {limit}] (the model's "
                         f"max_position_embeddings)")
    cut = sum(len(e) > max_length for e in encoded)
    rows = [formats.Encoded(e.ids[:max_length], e.mask[:max_length]) for e in encoded]
    order = np.argsort([-len(r) for r in rows], kind="stable")
    buckets = formats.length_buckets(max(max_length, 16))
    total, count = 0.0, 0.0
    for start in range(0, len(order), batch_size):
        batch = [rows[i] for i in order[start:start + batch_size]]
        length = formats.bucket_length(max(len(r) for r in batch), buckets)
        ids, valid, mask = formats.pad_batch(batch, length, model.tokenizer.pad_id)
        with model._scope():
            s, c = masked_nll(model.params, model.config, ids, valid, mask)
        total, count = total + float(s), count + float(c)
    if count == 0:
        raise ValueError("heldout_loss: no token carries loss")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(count),
            "samples": len(encoded), "truncated": int(cut)}
