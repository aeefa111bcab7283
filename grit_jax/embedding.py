"""GRIT embeddings: attention over the whole formatted input, pooling over its text tokens."""

from __future__ import annotations

from functools import partial

import jax

from grit_jax.config import ModelConfig
from grit_jax.model import KVCache, forward, project
from grit_jax.pooling import l2_normalize, pool

ATTN_MODES = ("bbcc", "cccc", "bb", "cc")


def embedding_attention(attn: str) -> str:
    """Attention mode of the embedding pass for a GRIT ``attn`` string (generation is causal)."""
    if attn not in ATTN_MODES:
        raise ValueError(f"attn must be one of {ATTN_MODES} (mixed attention is not supported), "
                         f"got {attn!r}")
    return "bidirectional" if attn.startswith("bb") else "causal"


def represent(params, config: ModelConfig, hidden, pool_mask, pooling: str = "mean",
              normalize: bool = True):
    """Embeddings from hidden states: pooled over pool_mask, through the embedding head when the
    model has one (a linear map commutes with every pooling, whose weights sum to 1, so this
    equals the reference's projection of every token before pooling), then L2-normalised."""
    reps = pool(hidden, pool_mask, pooling)
    if config.projection_dim:
        reps = project(params, config, reps)
    return l2_normalize(reps) if normalize else reps


@partial(jax.jit, static_argnames=("config", "mode", "pooling", "normalize"))
def embed(params, config: ModelConfig, ids, valid, pool_mask, *, mode: str = "bidirectional",
          pooling: str = "mean", normalize: bool = True):
    """Embeddings (B, embedding_dim) float32 of right-padded ids; pool_mask is 1 on text tokens."""
    hidden = forward(params, config, ids, valid, mode=mode).hidden
    return represent(params, config, hidden, pool_mask * valid, pooling, normalize)


@partial(jax.jit, static_argnames=("config", "mode", "pooling", "normalize"))
def embed_with_cache(params, config: ModelConfig, ids, valid, pool_mask, *,
                     mode: str = "bidirectional", pooling: str = "mean", normalize: bool = True):
    """Embeddings as ``embed`` and the key/value states of the same pass (a KVCache of T slots).

    The states are those a causal continuation attends to: RAG reuses them instead of running
    the text through the model again.
    """
    cache = KVCache.empty(config, ids.shape[0], ids.shape[1])
    out = forward(params, config, ids, valid, mode=mode, cache=cache)
    return represent(params, config, out.hidden, pool_mask * valid, pooling, normalize), out.cache
