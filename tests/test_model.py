"""The Flax decoder: masks, both attention modes against an independent reference, KV cache, remat,
sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grit_jax import sharding
from grit_jax.config import tiny_config
from grit_jax.model import (KVCache, abstract_params, attention_mask, forward, init_params,
                            is_per_layer, logits_fn, prompt_spans, rope_inv_freq, split_layers)
from tests import reference_numpy

CFG = tiny_config(vocab_size=96, hidden_size=32, intermediate_size=40, num_layers=2, num_heads=4,
                  num_kv_heads=2, rope_theta=1000.0)


@pytest.fixture(scope="module")
def params():
    p = init_params(CFG, seed=3)
    # Non-trivial norms so the reference check covers them.
    rng = np.random.RandomState(0)
    p = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 * rng.randn(*x.shape).astype(x.dtype)
        if "scale" in jax.tree_util.keystr(path) else x, p)
    return p


def batch(b=3, t=10, seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, CFG.vocab_size, (b, t)).astype(np.int32)
    valid = np.ones((b, t), bool)
    valid[1 % b, 7:] = False
    valid[2 % b, 4:] = False
    return ids, valid


def test_attention_mask_modes():
    pos = jnp.arange(5)[None]
    valid = jnp.array([[True, True, True, True, False]])
    causal = np.asarray(attention_mask(pos, pos, valid, "causal"))[0, 0]
    bidir = np.asarray(attention_mask(pos, pos, valid, "bidirectional"))[0, 0]
    np.testing.assert_array_equal(causal, np.tril(np.ones((5, 5), bool)) & np.asarray(valid))
    np.testing.assert_array_equal(bidir, np.broadcast_to(np.asarray(valid), (5, 5)))
    windowed = np.asarray(attention_mask(pos, pos, valid, "causal", sliding_window=2))[0, 0]
    assert windowed[3].tolist() == [False, False, True, True, False]
    # The window is ignored in bidirectional mode (embeddings see the whole input).
    np.testing.assert_array_equal(
        np.asarray(attention_mask(pos, pos, valid, "bidirectional", sliding_window=2))[0, 0], bidir)
    with pytest.raises(ValueError, match="attention mode"):
        attention_mask(pos, pos, valid, "bidi")


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_modes_match_independent_reference(params, mode):
    ids, valid = batch()
    got = np.asarray(forward(params, CFG, ids, valid, mode=mode).hidden)
    want = reference_numpy.hidden_states(params, CFG, ids, valid, mode,
                                         np.asarray(rope_inv_freq(CFG), np.float64))
    np.testing.assert_allclose(got * valid[..., None], want * valid[..., None], atol=2e-5)


def test_modes_differ(params):
    ids, valid = batch()
    causal = np.asarray(forward(params, CFG, ids, valid, mode="causal").hidden)
    bidir = np.asarray(forward(params, CFG, ids, valid, mode="bidirectional").hidden)
    # The first token sees only itself causally but the whole row bidirectionally.
    assert np.abs(causal[:, 0] - bidir[:, 0]).min() > 1e-3
    # The last valid token of a row sees the same keys in both modes: identical in layer 1 only,
    # so the outputs still differ through earlier positions; check the modes are not swapped:
    ids2 = ids.copy()
    ids2[0, -1] = (ids2[0, -1] + 1) % CFG.vocab_size  # change the last token
    c2 = np.asarray(forward(params, CFG, ids2, valid, mode="causal").hidden)
    b2 = np.asarray(forward(params, CFG, ids2, valid, mode="bidirectional").hidden)
    np.testing.assert_allclose(c2[0, :-1], causal[0, :-1], atol=1e-6)  # causal: no effect earlier
    assert np.abs(b2[0, 0] - bidir[0, 0]).max() > 1e-4  # bidirectional: the first token changes


def prompt_mask(valid, seed=1):
    """Prompt/reply spans as a chat has them: a prompt, a reply, a second prompt, a reply."""
    rng = np.random.RandomState(seed)
    prompt = np.zeros_like(valid)
    for r in range(valid.shape[0]):
        n = int(valid[r].sum())
        a, b, c = sorted(rng.choice(np.arange(1, n), 3, replace=False)) if n > 3 else (1, n, n)
        prompt[r, :a] = True
        prompt[r, b:c] = True
    return prompt & valid


def test_prefix_mask_matches_its_elementwise_definition():
    rng = np.random.RandomState(0)
    prompt = rng.rand(3, 9) < 0.6
    valid = np.ones((3, 9), bool)
    valid[1, 6:] = False
    pos = jnp.broadcast_to(jnp.arange(9), (3, 9))
    got = np.asarray(attention_mask(pos, pos, valid, "prefix", None,
                                    prompt_spans(prompt & valid)))[:, 0]
    for r in range(3):
        for i in range(9):
            for j in range(9):
                want = reference_numpy.allowed(i, j, valid[r], "prefix", None, prompt[r] & valid[r])
                assert got[r, i, j] == want, (r, i, j)
    with pytest.raises(ValueError, match="prompt spans"):
        attention_mask(pos, pos, valid, "prefix")


@pytest.mark.parametrize("window", [None, 3])
def test_prefix_mode_matches_independent_reference(params, window):
    cfg = CFG.replace(sliding_window=window)
    ids, valid = batch()
    prompt = prompt_mask(valid)
    got = np.asarray(forward(params, cfg, ids, valid, mode="prefix", prompt=prompt).hidden)
    want = reference_numpy.hidden_states(params, cfg, ids, valid, "prefix",
                                         np.asarray(rope_inv_freq(cfg), np.float64), prompt)
    np.testing.assert_allclose(got * valid[..., None], want * valid[..., None], atol=2e-5)


def test_prefix_mode_between_causal_and_bidirectional_and_never_sees_a_later_reply(params):
    ids, valid = batch()
    def run(mode, x=ids, **kw):
        return np.asarray(forward(params, CFG, x, valid, mode=mode, **kw).hidden)
    v = valid[..., None]
    np.testing.assert_allclose(run("prefix", prompt=np.zeros_like(valid)) * v, run("causal") * v,
                               atol=1e-6)
    np.testing.assert_allclose(run("prefix", prompt=valid) * v, run("bidirectional") * v,
                               atol=1e-6)
    prompt = prompt_mask(valid)
    base = run("prefix", prompt=prompt)
    assert np.abs(base[:, 0] - run("causal")[:, 0]).max() > 1e-3  # the prompt reads ahead
    row = 0
    reply = np.flatnonzero(valid[row] & ~prompt[row])[0]  # the first reply token of row 0
    changed = ids.copy()
    changed[row, reply] = (changed[row, reply] + 1) % CFG.vocab_size
    np.testing.assert_allclose(run("prefix", changed, prompt=prompt)[row, :reply],
                               base[row, :reply], atol=1e-6)
    with pytest.raises(ValueError, match="prompt mask"):
        run("prefix")
    with pytest.raises(ValueError, match="prompt mask"):
        run("causal", prompt=prompt)


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_padding_does_not_leak(params, mode):
    ids, valid = batch()
    alone = np.asarray(forward(params, CFG, ids[2:3, :4], valid[2:3, :4], mode=mode).hidden)
    noisy = ids.copy()
    noisy[2, 4:] = 5  # different padding content
    padded = np.asarray(forward(params, CFG, noisy, valid, mode=mode).hidden)
    np.testing.assert_allclose(padded[2, :4], alone[0], atol=1e-6)


def test_sliding_window_causal_matches_reference(params):
    cfg = CFG.replace(sliding_window=3)
    ids, valid = batch()
    got = np.asarray(forward(params, cfg, ids, valid, mode="causal").hidden)
    want = reference_numpy.hidden_states(params, cfg, ids, valid, "causal",
                                         np.asarray(rope_inv_freq(cfg), np.float64))
    np.testing.assert_allclose(got * valid[..., None], want * valid[..., None], atol=2e-5)
    full = np.asarray(forward(params, CFG, ids, valid, mode="causal").hidden)
    assert np.abs(full[0, -1] - got[0, -1]).max() > 1e-4
    bidir_w = np.asarray(forward(params, cfg, ids, valid, mode="bidirectional").hidden)
    bidir = np.asarray(forward(params, CFG, ids, valid, mode="bidirectional").hidden)
    np.testing.assert_allclose(bidir_w, bidir, atol=1e-6)


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_kv_cache_prefill_then_decode_equals_full_forward(params, mode):
    ids, valid = batch(b=2, t=9)
    valid = np.ones_like(valid)
    lengths = np.array([5, 3])
    prompt_valid = np.arange(9)[None] < lengths[:, None]
    cache = KVCache.empty(CFG, 2, 16)
    out = forward(params, CFG, ids, prompt_valid, mode=mode, cache=cache)
    np.testing.assert_array_equal(np.asarray(out.cache.lengths), lengths)
    cache = out.cache
    # Decode the next 3 tokens of each row one at a time (causally).
    steps = []
    for s in range(3):
        nxt = ids[np.arange(2), lengths + s]
        o = forward(params, CFG, nxt[:, None], None, mode="causal", cache=cache)
        cache = o.cache
        steps.append(np.asarray(o.hidden[:, 0]))
    inv_freq = np.asarray(rope_inv_freq(CFG), np.float64)
    for r in range(2):
        n = lengths[r] + 3
        # Reference: the prompt attends in `mode`, the continuation causally.
        ref_mode = "causal" if mode == "causal" else f"prefix:{lengths[r]}"
        want = reference_numpy.hidden_states(params, CFG, ids[r:r + 1, :n],
                                             np.ones((1, n), bool), ref_mode, inv_freq)[0]
        np.testing.assert_allclose(np.stack([st[r] for st in steps]), want[lengths[r]:n],
                                   atol=2e-5)
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths + 3)


def test_cached_chunk_equals_uncached_forward(params):
    """A bidirectional prefix in the cache + a causal suffix chunk = one forward with that mask."""
    ids, _ = batch(b=1, t=8)
    cache = KVCache.empty(CFG, 1, 8)
    cache = forward(params, CFG, ids[:, :5], None, mode="causal", cache=cache).cache
    tail = forward(params, CFG, ids[:, 5:], None, mode="causal", cache=cache)
    full = forward(params, CFG, ids, None, mode="causal")
    np.testing.assert_allclose(np.asarray(tail.hidden), np.asarray(full.hidden[:, 5:]), atol=2e-5)


def test_logits_and_tied_head(params):
    ids, valid = batch()
    hidden = forward(params, CFG, ids, valid).hidden
    lg = np.asarray(logits_fn(params, CFG, hidden))
    np.testing.assert_allclose(lg, np.asarray(hidden) @ np.asarray(params["lm_head"]["kernel"]),
                               atol=1e-5)
    tied = CFG.replace(tie_word_embeddings=True)
    tp = init_params(tied)
    assert "lm_head" not in tp
    h = forward(tp, tied, ids, valid).hidden
    np.testing.assert_allclose(np.asarray(logits_fn(tp, tied, h)),
                               np.asarray(h) @ np.asarray(tp["embed"]["embedding"]).T, atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policies_same_values_and_grads(params, policy):
    ids, valid = batch()
    cfg = CFG.replace(remat_policy=policy)

    def loss(p, c):
        return jnp.sum(forward(p, c, ids, valid, mode="bidirectional").hidden ** 2)

    v0, g0 = jax.value_and_grad(loss)(params, CFG)
    v1, g1 = jax.value_and_grad(loss)(params, cfg)
    np.testing.assert_allclose(v0, v1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g0, g1)


def test_bf16_compute_close_to_fp32(params):
    ids, valid = batch()
    f32 = np.asarray(forward(params, CFG, ids, valid).hidden)
    bf16 = np.asarray(forward(params, CFG.replace(dtype="bfloat16"), ids, valid).hidden,
                      np.float32)
    assert np.abs(bf16 - f32).max() < 0.1


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2), (8, 1, 1)])
def test_sharded_forward_matches_single_device(shape):
    """A partitioned forward equals one device up to reduction order (float64,
    tests/tolerances.py)."""
    from tests.tolerances import FLOAT64_ATOL, FLOAT64_RTOL

    with jax.enable_x64(True):
        cfg = CFG.replace(dtype="float64", param_dtype="float64")
        params = init_params(cfg, seed=3)
        mesh = sharding.make_mesh(shape)
        boxed = abstract_params(cfg)
        sharding.check_divisible(boxed, mesh)
        shardings = sharding.param_shardings(boxed, mesh)
        ids, valid = batch(b=8, t=10)
        placed = jax.device_put(params, shardings)
        assert placed["layers"]["mlp"]["gate"].sharding.spec == jax.sharding.PartitionSpec(
            None, "fsdp", "tensor")
        bs = sharding.batch_sharding(mesh)
        with sharding.activate(mesh):
            fn = jax.jit(lambda p, i, v: forward(p, cfg, i, v, mode="bidirectional").hidden,
                         in_shardings=(shardings, bs, bs))
            got = np.asarray(fn(placed, ids, valid))
        want = np.asarray(forward(params, cfg, ids, valid, mode="bidirectional").hidden)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)


def test_split_layers_consume_frees_the_stack_and_gives_the_same_layers():
    """consume=True (loading for inference): the same per-layer arrays, and every stacked
    array is deleted once split, so the split never holds two copies of the model."""
    stacked = init_params(CFG, seed=3)
    expect = split_layers(stacked)
    got = split_layers(init_params(CFG, seed=3), consume=True)
    jax.tree.map(np.testing.assert_array_equal, got, expect)
    fresh = init_params(CFG, seed=3)
    split_layers(fresh, consume=True)
    assert all(a.is_deleted() for a in jax.tree.leaves(fresh["layers"]))
    assert not any(a.is_deleted() for k, v in fresh.items() if k != "layers"
                   for a in jax.tree.leaves(v))


@pytest.mark.parametrize("family", ["mistral", "mixtral"])
def test_per_layer_params_equal_the_scanned_stack(family):
    """The inference layout (per-layer weights, per-layer cache buffers) computes what the
    scanned stack computes: hidden states, caches and routing statistics in both modes, up to
    float64 reordering; its layers are the stack's slices and the fingerprint is the same."""
    from grit_jax.fingerprint import model_fingerprint
    from tests.tolerances import FLOAT64_ATOL, FLOAT64_RTOL

    close = lambda a, b: np.testing.assert_allclose(  # noqa: E731
        np.asarray(a), np.asarray(b), rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)
    with jax.enable_x64(True):
        cfg = CFG.replace(family=family, dtype="float64", param_dtype="float64",
                          **({"num_experts": 4, "num_experts_per_tok": 2} if family == "mixtral"
                             else {}))
        stacked = init_params(cfg, seed=3)
        split = split_layers(stacked)
        assert is_per_layer(split) and not is_per_layer(stacked) and "layers" not in split
        assert split_layers(split) is split
        for i in range(cfg.num_layers):
            jax.tree.map(lambda s, p: np.testing.assert_array_equal(s[i], p),
                         stacked["layers"], split[f"layer_{i}"])
        assert model_fingerprint(split, cfg) == model_fingerprint(stacked, cfg)
        ids, valid = batch(b=3, t=10)
        for mode in ("causal", "bidirectional"):
            a, b = (forward(p, cfg, ids, valid, mode=mode) for p in (stacked, split))
            close(a.hidden, b.hidden)
            assert not np.allclose(np.asarray(a.hidden), np.asarray(
                forward(split, cfg, ids, valid, mode="bidirectional" if mode == "causal"
                        else "causal").hidden))
            if family == "mixtral":
                jax.tree.map(close, a.router, b.router)
            cache = KVCache.empty(cfg, 3, 12)
            a, b = (forward(p, cfg, ids, valid, mode=mode, cache=cache).cache
                    for p in (stacked, split))
            assert not b.per_layer and b.k.shape == a.k.shape  # the caller's layout comes back
            close(a.k, b.k), close(a.v, b.v)
            c = forward(split, cfg, ids, valid, mode=mode, cache=cache.split()).cache
            assert c.per_layer and len(c.k) == cfg.num_layers and c.size == 12
            close(a.k, c.stacked().k), close(a.v, c.stacked().v)
            np.testing.assert_array_equal(a.lengths, c.lengths)
        h = np.random.RandomState(1).randn(3, 2, cfg.hidden_size)
        close(logits_fn(stacked, cfg, h), logits_fn(split, cfg, h))


def test_indivisible_mesh_fails_before_compiling():
    mesh = sharding.make_mesh((1, 1, 8))
    with pytest.raises(ValueError, match="kv_heads=2"):
        sharding.check_divisible(abstract_params(CFG), mesh)
