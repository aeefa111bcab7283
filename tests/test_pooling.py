"""Pooling against a plain NumPy reference (the reference implementation's formulas)."""

import numpy as np
import pytest

from grit_jax.pooling import l2_normalize, pool


def numpy_pool(h, m, method):
    h, m = h.astype(np.float64), m.astype(np.float64)
    out = []
    for hb, mb in zip(h, m):
        idx = np.nonzero(mb)[0]
        if method == "cls":
            out.append(hb[0])
        elif method == "lasttoken":
            out.append(hb[idx[-1]] if len(idx) else np.zeros(h.shape[-1]))
        else:
            w = mb * np.cumsum(mb) if method == "weightedmean" else mb
            out.append((hb * w[:, None]).sum(0) / max(w.sum(), 1.0))
    return np.stack(out)


@pytest.mark.parametrize("method", ["mean", "weightedmean", "lasttoken", "cls"])
def test_pool_matches_numpy(method):
    rng = np.random.RandomState(0)
    h = rng.randn(4, 7, 5).astype(np.float32)
    m = np.array([[0, 0, 1, 1, 1, 0, 0], [1] * 7, [0, 1, 0, 0, 0, 0, 0], [0] * 7], np.int32)
    got = np.asarray(pool(h, m, method))
    np.testing.assert_allclose(got, numpy_pool(h, m, method), atol=1e-6)
    assert np.isfinite(got).all()  # an empty mask pools to zeros, not NaN


def test_pool_is_float32_for_bf16_inputs():
    import jax.numpy as jnp

    h = jnp.ones((1, 3, 4), jnp.bfloat16)
    assert pool(h, np.ones((1, 3)), "mean").dtype == jnp.float32


def test_l2_normalize():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(np.asarray(l2_normalize(x)), [[0.6, 0.8], [0.0, 0.0]])


def test_unknown_method():
    with pytest.raises(ValueError, match="pooling method"):
        pool(np.zeros((1, 2, 3)), np.ones((1, 2)), "max")
