"""Key/value states of a token prefix, kept on the host and reused by later generation.

GRIT's embedding pass over ``<s><|embed|>\\n{text}`` computes, per layer, the keys and values a
causal continuation would attend to; storing them lets generation skip that prefix (RAG doc and
query caching). A ``PrefixCache`` holds one text's states; ``join`` concatenates several along
the sequence and ``to_kv_cache`` pads a batch of them into the model's static-size ``KVCache``.

Positions when joining: every part was computed from position 0. With ``rerotate=True``
(default) each part's keys are rotated (``model.shift_rope``) to the place the part takes in the
joined sequence, so the joined cache has the consistent positions 0..N-1 of one text whose
parts did not attend to each other; a later part's leading BOS is dropped (``drop_inner_bos``)
so the joined sequence has one BOS, like any prompt. ``rerotate=False, drop_inner_bos=False`` is
the reference implementation's behaviour: each part keeps the positions it was computed with.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from grit_jax.config import ModelConfig
from grit_jax.model import KVCache, shift_rope


@dataclasses.dataclass(frozen=True)
class PrefixCache:
    """Token ids (n,) and their keys/values (layers, n, kv_heads, head_dim) at positions 0..n-1."""

    ids: np.ndarray
    k: np.ndarray
    v: np.ndarray

    def __post_init__(self):
        n = len(self.ids)
        if self.k.shape != self.v.shape or self.k.ndim != 4 or self.k.shape[1] != n:
            raise ValueError(f"PrefixCache: ids ({n},), k {self.k.shape} and v {self.v.shape} "
                             f"do not describe one prefix of (layers, {n}, kv_heads, head_dim)")

    def __len__(self):
        return len(self.ids)

    def check_model(self, config: ModelConfig) -> None:
        """Fail clearly when these states cannot belong to a model of this config."""
        want = (config.num_layers, config.num_kv_heads, config.resolved_head_dim)
        got = (self.k.shape[0], self.k.shape[2], self.k.shape[3])
        if got != want:
            raise ValueError(f"a cache of (layers, kv_heads, head_dim) = {got} does not fit a "
                             f"model with {want}")


def join(parts: Sequence[PrefixCache], config: ModelConfig, *, rerotate: bool = True,
         drop_inner_bos: bool = True, bos_id: int | None = None) -> PrefixCache:
    """One prefix from several computed independently, in order (see the module docstring)."""
    if not parts:
        raise ValueError("join: no caches to join")
    ids, ks, vs, offset = [], [], [], 0
    for j, part in enumerate(parts):
        part.check_model(config)
        start = 1 if (j and drop_inner_bos and bos_id is not None and len(part)
                      and int(part.ids[0]) == bos_id) else 0
        k, v = part.k[:, start:], part.v[:, start:]
        delta = offset - start
        if rerotate and delta:
            k = np.asarray(shift_rope(k, delta, config))
        ids.append(part.ids[start:])
        ks.append(k)
        vs.append(v)
        offset += len(part) - start
    return PrefixCache(np.concatenate(ids), np.concatenate(ks, axis=1), np.concatenate(vs, axis=1))


def to_kv_cache(prefixes: Sequence[PrefixCache], size: int, dtype) -> KVCache:
    """A batch KVCache of ``size`` slots holding each prefix at slots 0..len-1 (zeros after)."""
    layers, _, g, d = prefixes[0].k.shape
    k = np.zeros((layers, len(prefixes), size, g, d), dtype)
    v = np.zeros_like(k)
    for b, p in enumerate(prefixes):
        if len(p) > size:
            raise ValueError(f"prefix {b} has {len(p)} tokens, more than the cache size {size}")
        k[:, b, :len(p)], v[:, b, :len(p)] = p.k, p.v
    lengths = np.asarray([len(p) for p in prefixes], np.int32)
    return KVCache(jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths))
