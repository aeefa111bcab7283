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
    with np.errstate(invalid="ignore"):  # fully masked (padding) rows come out NaN
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
    if mode == "causal":  # each query block reads only the keys it can see: the same values
        skipping = attn.blocked_attention(q, k, v, mask, d ** -0.5, block, reach=1,
                                          window=window)
        np.testing.assert_allclose(np.where(rows, skipping, 0), np.where(rows, want, 0),
                                   atol=2e-6)
        via_call = attn.attention(q, k, v, attn.SelfMask(jnp.asarray(valid), mode, window),
                                  d ** -0.5, "blocked")
        np.testing.assert_allclose(np.where(rows, via_call, 0), np.where(rows, want, 0),
                                   atol=2e-6)
    else:  # a per-key bias instead of the dense mask: the same values, directly and via the call
        for mask_parts in (attn.KeyMask(jnp.asarray(valid)),
                           attn.SelfMask(jnp.asarray(valid), mode)):
            biased = attn.attention(q, k, v, mask_parts, d ** -0.5, "blocked")
            assert np.isfinite(np.asarray(biased)).all()
            np.testing.assert_allclose(np.where(rows, biased, 0), np.where(rows, want, 0),
                                       atol=2e-6)


def test_key_mask_gradients_equal_xla_and_padding_rows_stay_finite():
    """The per-key bias (KeyMask) backward equals XLA's call's on a dense mask; a sequence that
    is all padding (every key hidden) gives finite values and gradients."""
    b, t, h, g, d = 3, 37, 4, 2, 8
    q, k, v = inputs(b, t, h, g, d, seed=3)
    valid = np.ones((b, t), bool)
    valid[1, 30:] = False
    valid[2, :] = False
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    dense = attention_mask(pos, pos, jnp.asarray(valid), "bidirectional")
    w = np.random.RandomState(4).randn(b, t, h, d).astype(np.float32) * valid[:, :, None, None]

    def grads(fn):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)

    got = grads(lambda q, k, v: attn.blocked_attention(q, k, v, attn.KeyMask(jnp.asarray(valid)),
                                                       0.35, 8))
    want = grads(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=dense, scale=0.35))
    for a, e in zip(got, want):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(a, e, atol=2e-5 * float(jnp.abs(e).max()))


def test_blocked_causal_and_bidirectional_differ():
    q, k, v = inputs(2, 40, 4, 2, 8)
    pos = jnp.broadcast_to(jnp.arange(40), (2, 40))
    valid = jnp.ones((2, 40), bool)
    out = {m: np.asarray(attn.blocked_attention(q, k, v, attention_mask(pos, pos, valid, m),
                                                0.3, 16))
           for m in ("causal", "bidirectional")}
    assert np.abs(out["causal"] - out["bidirectional"]).max() > 1e-2
    np.testing.assert_allclose(out["causal"][:, -1], out["bidirectional"][:, -1], atol=1e-6)


@pytest.mark.parametrize("reach,window", [(None, None), (1, None), (1, 6), (5, None)])
def test_blocked_gradients_equal_xla(reach, window):
    b, t, h, g, d = 2, 37, 4, 2, 8
    q, k, v = inputs(b, t, h, g, d, seed=1)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = attention_mask(pos, pos, jnp.ones((b, t), bool), "causal", window)
    if reach is not None and reach > 1:  # queries after reach - 1 cached slots (as a KV cache)
        mask = attention_mask(pos + reach - 1, pos, jnp.ones((b, t), bool), "causal", window)
    w = jnp.asarray(np.random.RandomState(2).randn(b, t, h, d).astype(np.float32))

    def loss(fn):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)

    got = loss(lambda q, k, v: attn.blocked_attention(q, k, v, mask, 0.35, 8, reach=reach,
                                                      window=window))
    want = loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, scale=0.35))
    for a, e in zip(got, want):
        np.testing.assert_allclose(a, e, atol=2e-5 * float(jnp.abs(e).max()))


def test_resolve():
    cpu = jax.default_backend() == "cpu"
    assert attn.resolve("auto", 512) == ("blocked" if cpu else "xla")
    assert attn.resolve("auto", 1) == "xla"  # decode steps
    assert attn.resolve("xla", 512) == "xla" and attn.resolve("blocked", 1) == "blocked"
    assert (attn.resolve("auto", 512, "tpu") == "splash"
            and attn.resolve("auto", 512, "cpu") == "blocked")
    assert attn.resolve("auto", 512, "gpu") == "xla"
    # Splash builds its own masks: calls with a cache or explicit positions take XLA's kernel.
    assert attn.resolve("auto", 512, "tpu", self_attention=False) == "xla"
    assert attn.resolve("splash_interpret", 64, self_attention=False) == "xla"
    # AOT compilation for TPUs traces on a CPU host: "auto" is pinned for the target.
    assert (attn.for_platform("auto", "tpu") == "splash"
            and attn.for_platform("auto", "cpu") == "auto")
    assert attn.for_platform("auto", "gpu") == "xla"
    assert attn.for_platform("blocked", "tpu") == "blocked"
    with pytest.raises(ValueError, match="needs a TPU.*splash_interpret"):
        attn.check_platform("splash", "cpu")
    attn.check_platform("splash", "tpu")


# ----------------------------------------------------------------------------------------------
# Splash (the TPU kernel), run by the Pallas interpreter on this CPU
# ----------------------------------------------------------------------------------------------
U32 = 2.0 ** -24  # float32 unit roundoff


def numpy_attention_grads(q, k, v, mask, scale, w):
    """float64 NumPy gradients of sum(attention(q, k, v) * w) w.r.t. q, k, v (GQA: a key/value
    head's gradient sums over its query group)."""
    q, k, v, w = (np.asarray(x, np.float64) for x in (q, k, v, w))
    r = q.shape[2] // k.shape[2]
    kk, vv = np.repeat(k, r, axis=2), np.repeat(v, r, axis=2)
    s = np.where(np.asarray(mask), np.einsum("bthd,bshd->bhts", q, kk) * scale, -np.inf)
    with np.errstate(invalid="ignore"):  # fully masked (padding) rows: no gradient
        p = np.exp(s - s.max(-1, keepdims=True))
        p = np.nan_to_num(p / p.sum(-1, keepdims=True))
    do = w.transpose(0, 2, 1, 3)  # (b, h, t, d)
    dv = np.einsum("bhts,bhtd->bshd", p, do)
    dp = np.einsum("bhtd,bshd->bhts", do, vv)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) * scale
    dq = np.einsum("bhts,bshd->bthd", ds, kk)
    dk = np.einsum("bhts,bthd->bshd", ds, q)
    group = lambda x: x.reshape(x.shape[:2] + (k.shape[2], r, x.shape[-1])).sum(3)  # noqa: E731
    return dq, group(dk), group(dv)


def float32_bound(q, k, v, scale, extra=1.0):
    """Worst-case error of float32 attention: logits are D-term dot products (error <= D u
    sum|q k| scale), a logit error e moves the softmax output by <= 2 e max|v|, and the output
    sums S terms (<= S u max|v|). ``extra`` scales it for the backward pass's longer chains."""
    d, s = q.shape[-1], k.shape[1]
    logits = d * U32 * scale * float(np.abs(q).max() * np.abs(k).max()) * d
    return extra * (2 * logits + s * U32) * float(np.abs(v).max())


SPLASH_CASES = [("causal", None), ("bidirectional", None), ("causal", 9)]


def splash_case(mode, window, t=70, seed=0):
    b, h, g, d = 2, 4, 2, 16
    q, k, v = inputs(b, t, h, g, d, seed)
    valid = np.ones((b, t), bool)
    valid[1, t - 13:] = False  # right padding
    self_mask = attn.SelfMask(jnp.asarray(valid), mode, window)
    return q, k, v, valid, self_mask


@pytest.mark.parametrize("mode,window", SPLASH_CASES)
def test_splash_equals_float64_reference(mode, window):
    q, k, v, valid, self_mask = splash_case(mode, window)
    scale = q.shape[-1] ** -0.5
    got = attn.splash_attention(q, k, v, self_mask, scale, interpret=True)
    want = numpy_attention(q, k, v, self_mask.dense(), scale)
    rows = valid[:, :, None, None]  # padded query rows: any finite value
    assert np.isfinite(np.asarray(got)).all()
    err = np.abs(np.where(rows, np.asarray(got, np.float64) - want, 0)).max()
    assert err <= float32_bound(q, k, v, scale), err
    # The dispatcher takes the same kernel for a SelfMask and impl splash_interpret.
    same = attn.attention(q, k, v, self_mask, scale, "splash_interpret")
    np.testing.assert_array_equal(np.asarray(same), np.asarray(got))


@pytest.mark.parametrize("mode,window", SPLASH_CASES)
def test_splash_gradients_equal_float64_reference(mode, window):
    q, k, v, valid, self_mask = splash_case(mode, window, seed=3)
    scale = q.shape[-1] ** -0.5
    # Upstream gradient zero on padded query rows (their outputs are never used).
    w = np.random.RandomState(4).randn(*q.shape).astype(np.float32) * valid[:, :, None, None]
    got = jax.grad(lambda q, k, v: jnp.sum(attn.splash_attention(q, k, v, self_mask, scale,
                                                                 interpret=True) * w),
                   argnums=(0, 1, 2))(q, k, v)
    want = numpy_attention_grads(q, k, v, self_mask.dense(), scale, w)
    # dV sums T products of P and dO; dQ and dK add the dP = dO V^T dot and a sum over S keys.
    t = q.shape[1]
    bound = float32_bound(q, k, v, scale, extra=4 * t * float(np.abs(w).max()))
    for name, a, e in zip("qkv", got, want):
        err = np.abs(np.asarray(a, np.float64) - e).max()
        assert err <= bound, (name, err, bound)
        assert err < 1e-4 * np.abs(e).max(), (name, err)


def test_splash_causal_and_bidirectional_differ():
    q, k, v, valid, _ = splash_case("causal", None)
    out = {m: np.asarray(attn.splash_attention(q, k, v, attn.SelfMask(jnp.asarray(valid), m),
                                               0.25, interpret=True))
           for m in ("causal", "bidirectional")}
    assert np.abs(out["causal"] - out["bidirectional"]).max() > 1e-2
    # The last real token sees everything in both modes.
    np.testing.assert_allclose(out["causal"][0, -1], out["bidirectional"][0, -1], atol=1e-6)


def test_splash_on_a_mesh_equals_one_device():
    """Under shard_map over batch (data x fsdp) and heads (tensor), each device runs the kernel
    on its rows and heads: the result is the single-device kernel's, bit for bit."""
    from grit_jax import sharding

    q, k, v, valid, self_mask = splash_case("causal", None, t=140)
    one = attn.splash_attention(q, k, v, self_mask, 0.25, interpret=True)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
    with sharding.activate(mesh):
        many = jax.jit(lambda *a: attn.splash_attention(*a, self_mask, 0.25, interpret=True))(
            q, k, v)
    np.testing.assert_array_equal(np.asarray(many), np.asarray(one))


def test_bad_impl_is_refused():
    from grit_jax.config import ModelConfig

    with pytest.raises(ValueError, match="attention_impl='flash'"):
        ModelConfig(attention_impl="flash")


@pytest.mark.parametrize("cached", [False, True])
def test_model_causal_passes_skip_hidden_keys_with_the_same_values(cached, monkeypatch):
    """A 300-token causal pass (two query blocks) through the model: the blocked kernel, which
    reads only the keys each block can see (CausalMask), gives XLA's call's hidden states, for
    self-attention and for a prefill into a KV cache with free slots after the prompt."""
    from grit_jax.config import tiny_config
    from grit_jax.model import KVCache, forward, init_params

    base = tiny_config(vocab_size=96, hidden_size=32, intermediate_size=40, num_layers=2,
                       num_heads=4, num_kv_heads=2, max_position_embeddings=512)
    params = init_params(base, seed=4)
    rng = np.random.RandomState(5)
    ids = jnp.asarray(rng.randint(3, 96, (2, 300)), jnp.int32)
    valid = np.ones((2, 300), bool)
    valid[1, 280:] = False
    seen = []  # what each attention call is told about the keys it may skip
    real = attn.attention
    monkeypatch.setattr(attn, "attention", lambda q, k, v, mask, *a: (
        seen.append((type(mask).__name__, getattr(mask, "reach", None))),
        real(q, k, v, mask, *a))[1])
    out = {}
    for impl in ("blocked", "xla"):
        cfg = base.replace(attention_impl=impl)
        cache = KVCache.empty(cfg, 2, 340) if cached else None
        out[impl] = np.asarray(forward(params, cfg, ids, jnp.asarray(valid), mode="causal",
                                       cache=cache).hidden)
    assert set(seen) == {("CausalMask", 340 - 300 + 1 if cached else 1)}, seen
    bidir = {impl: np.asarray(forward(params, base.replace(attention_impl=impl), ids,
                                      jnp.asarray(valid), mode="bidirectional").hidden)
             for impl in ("blocked", "xla")}
    assert seen[-1][0] == "KeyMask"  # bidirectional: nothing to skip, a per-key bias
    np.testing.assert_allclose(np.where(valid[:, :, None], bidir["blocked"], 0),
                               np.where(valid[:, :, None], bidir["xla"], 0),
                               atol=1e-5 * float(np.abs(bidir["xla"]).max()))
    rows = valid[:, :, None]
    scale = float(np.abs(out["xla"]).max())
    np.testing.assert_allclose(np.where(rows, out["blocked"], 0), np.where(rows, out["xla"], 0),
                               atol=1e-5 * scale)
