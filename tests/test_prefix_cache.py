"""Joined prefix caches: re-rotated keys sit exactly where a shifted computation puts them."""

import numpy as np
import pytest

from grit_jax.config import tiny_config
from grit_jax.model import KVCache, forward, init_params, shift_rope
from grit_jax.prefix_cache import PrefixCache, join, to_kv_cache

CONFIG = tiny_config(num_layers=3, rope_theta=1000.0)
PARAMS = init_params(CONFIG, seed=3)


def states(ids, start=0, mode="bidirectional"):
    """PrefixCache of ids computed at positions start..start+n-1."""
    ids = np.asarray(ids, np.int32)[None]
    n = ids.shape[1]
    cache = KVCache.empty(CONFIG, 1, n)
    pos = start + np.arange(n, dtype=np.int32)[None]
    out = forward(PARAMS, CONFIG, ids, None, mode=mode, positions=pos, cache=cache)
    return PrefixCache(ids[0], np.asarray(out.cache.k[:, 0]), np.asarray(out.cache.v[:, 0]))


def test_shift_rope_composes():
    x = np.random.default_rng(0).normal(size=(2, 5, 2, CONFIG.resolved_head_dim)).astype(np.float32)
    twice = shift_rope(shift_rope(x, 7, CONFIG), 11, CONFIG)
    np.testing.assert_allclose(twice, shift_rope(x, 18, CONFIG), atol=1e-5)
    np.testing.assert_allclose(shift_rope(shift_rope(x, 30, CONFIG), -30, CONFIG), x, atol=1e-5)


@pytest.mark.parametrize("drop_bos", [False, True])
def test_join_rerotates_to_joined_positions(drop_bos):
    # Bidirectional states depend only on relative positions (RoPE), so a text computed from
    # position p has keys R(p) * (its keys from 0) and identical values, at every layer.
    a, b = [1, 851, 349, 264, 1369], [1, 415, 5565, 10575, 754, 272, 17898]
    joined = join([states(a), states(b)], CONFIG, rerotate=True, drop_inner_bos=drop_bos, bos_id=1)
    skip = 1 if drop_bos else 0
    shifted = states(b, start=len(a) - skip)
    assert joined.ids.tolist() == a + b[skip:]
    np.testing.assert_allclose(joined.k[:, :len(a)], states(a).k, atol=1e-6)
    np.testing.assert_allclose(joined.k[:, len(a):], shifted.k[:, skip:], atol=2e-5)
    np.testing.assert_allclose(joined.v[:, len(a):], shifted.v[:, skip:], atol=2e-5)
    # Without re-rotation the second part keeps the keys computed from position 0 (reference).
    raw = join([states(a), states(b)], CONFIG, rerotate=False, drop_inner_bos=False)
    np.testing.assert_array_equal(raw.k[:, len(a):], states(b).k)
    assert np.abs(raw.k[:, len(a) + 1:] - np.asarray(
        join([states(a), states(b)], CONFIG, drop_inner_bos=False).k[:, len(a) + 1:])).max() > 1e-2


def test_causal_prefix_then_continuation_equals_one_pass():
    # The cached states of a causal pass + the rest of the text = one causal pass over all of it.
    ids = np.asarray([1, 851, 349, 264, 1369, 415, 5565, 10575, 754], np.int32)
    full = forward(PARAMS, CONFIG, ids[None], None, mode="causal").hidden
    prefix = states(ids[:5], mode="causal")
    cache = to_kv_cache([prefix], 9, np.float32)
    rest = forward(PARAMS, CONFIG, ids[None, 5:], None, mode="causal", cache=cache).hidden
    np.testing.assert_allclose(rest, full[:, 5:], atol=1e-5)


def test_prefix_cache_rejects_wrong_shapes():
    p = states([1, 2, 3])
    with pytest.raises(ValueError, match="do not describe one prefix"):
        PrefixCache(p.ids[:2], p.k, p.v)
    other = tiny_config(num_layers=2)
    with pytest.raises(ValueError, match="does not fit a model"):
        join([p, p], other)
    with pytest.raises(ValueError, match="no caches"):
        join([], CONFIG)
