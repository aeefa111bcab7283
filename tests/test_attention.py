"""The attention kernels against each other and an independent NumPy float64 reference."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from grit_jax import attention as attn
from grit_jax.model import attention_mask


def numpy_attention(q, k, v, mask, scale):
    """float64 NumPy reference: repeat kv heads, masked softmax, weighted sum."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    r = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, r, axis=2), np.repeat(v, r, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) * scale
    s = np.where(np.asarray(mask), s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


def inputs(b, t, h, g, d, seed=0):
    rng = np.random.RandomState(seed)
    return (rng.randn(b, t, h, d).astype(np.float32), rng.randn(b, t, g, d).astype(np.float32),
            rng.randn(b, t, g, d).astype(np.float32))


@pytest.mark.parametrize("mode,window", [("causal", None), ("bidirectional", None), ("causal", 5)])
@pytest.mark.parametrize("t,block", [(70, 16), (64, 64), (9, 4)])
def test_blocked_equals_xla_and_reference(mode, window, t, block):
    b, h, g, d = 3, 6, 2, 8
    q, k, v = inputs(b, t, h, g, d)
    valid = np.ones((b, t), bool)
    valid[1, t - 3:] = False  # right padding
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = attention_mask(pos, pos, jnp.asarray(valid), mode, window)
    want = numpy_attention(q, k, v, mask, d ** -0.5)
    blocked = attn.blocked_attention(q, k, v, mask, d ** -0.5, block)
    xla = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=d ** -0.5)
    rows = np.asarray(valid)[:, :, None, None]  # padded query rows: any finite value
    assert np.isfinite(np.asarray(blocked)).all()
    np.testing.assert_allclose(np.where(rows, blocked, 0), np.where(rows, want, 0), atol=2e-6)
    np.testing.assert_allclose(np.where(rows, blocked, 0), np.where(rows, xla, 0), atol=2e-6)


def test_blocked_causal_and_bidirectional_differ():
    q, k, v = inputs(2, 40, 4, 2, 8)
    pos = jnp.broadcast_to(jnp.arange(40), (2, 40))
    valid = jnp.ones((2, 40), bool)
    out = {m: np.asarray(attn.blocked_attention(q, k, v, attention_mask(pos, pos, valid, m), 0.3, 16))
           for m in ("causal", "bidirectional")}
    assert np.abs(out["causal"] - out["bidirectional"]).max() > 1e-2
    np.testing.assert_allclose(out["causal"][:, -1], out["bidirectional"][:, -1], atol=1e-6)


def test_blocked_gradients_equal_xla():
    b, t, h, g, d = 2, 37, 4, 2, 8
    q, k, v = inputs(b, t, h, g, d, seed=1)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = attention_mask(pos, pos, jnp.ones((b, t), bool), "causal")
    w = jnp.asarray(np.random.RandomState(2).randn(b, t, h, d).astype(np.float32))

    def loss(fn):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)

    got = loss(lambda q, k, v: attn.blocked_attention(q, k, v, mask, 0.35, 8))
    want = loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, scale=0.35))
    for a, e in zip(got, want):
        np.testing.assert_allclose(a, e, atol=2e-5 * float(jnp.abs(e).max()))


def test_resolve():
    cpu = jax.default_backend() == "cpu"
    assert attn.resolve("auto", 512) == ("blocked" if cpu else "xla")
    assert attn.resolve("auto", 1) == "xla"  # decode steps
    assert attn.resolve("xla", 512) == "xla" and attn.resolve("blocked", 1) == "blocked"
    assert attn.resolve("auto", 512, "tpu") == "xla" and attn.resolve("auto", 512, "cpu") == "blocked"
    # AOT compilation for TPUs traces on a CPU host: "auto" is pinned for the target.
    assert attn.for_platform("auto", "tpu") == "xla" and attn.for_platform("auto", "cpu") == "auto"
    assert attn.for_platform("blocked", "tpu") == "blocked"


def test_bad_impl_is_refused():
    from grit_jax.config import ModelConfig

    with pytest.raises(ValueError, match="attention_impl='flash'"):
        ModelConfig(attention_impl="flash")
