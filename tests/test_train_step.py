"""The train step: GradCache and split_emb equal the plain gradients; meshes equal one device."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grit_jax import sharding
from grit_jax.config import tiny_config
from grit_jax.losses import contrastive_loss, shard_chunks, token_ce, unshard_chunks
from grit_jax.model import KVCache, forward, init_params, logits_fn
from grit_jax.aot import cost as hlo_cost
from tests.tolerances import FLOAT64_ATOL, FLOAT64_RTOL, close64
from grit_jax.train_step import (LossConfig, gen_weights, init_state, jit_train_step,
                                 loss_and_grads, make_optimizer, reps, state_shardings,
                                 train_step)
from tests.reference_losses import generative_loss, token_cross_entropy

LC_OVERRIDES = {}
CFG = tiny_config(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=8, num_kv_heads=4)


def make_batch(seed=0, q=8, g=2, n_gen=8):
    rng = np.random.RandomState(seed)

    def rows(n, length, prefix):
        ids = rng.randint(3, CFG.vocab_size, (n, length)).astype(np.int32)
        lens = rng.randint(prefix + 2, length + 1, n)
        valid = np.arange(length)[None] < lens[:, None]
        mask = (valid & (np.arange(length)[None] >= prefix)).astype(np.int32)
        return ids, valid, mask

    b = {}
    b["query_ids"], b["query_valid"], b["query_pool"] = rows(q, 12, 4)
    b["passage_ids"], b["passage_valid"], b["passage_pool"] = rows(q * g, 16, 2)
    b["gen_ids"], b["gen_valid"], b["gen_loss"] = rows(n_gen, 16, 5)
    return b


# Every loss-and-gradient call in this module is jitted: op-by-op float64 execution of the model's
# backward pass crashed XLA:CPU late in full runs (never alone).
jit_loss_and_grads = jax.jit(loss_and_grads, static_argnums=(1, 2))


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, seed=1)


def assert_trees_close(a, b, atol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol,
                                                         rtol=1e-4), a, b)


def test_prefix_lm_generative_loss(params):
    """gen_attention='prefix': the loss of logits from a PrefixLM pass whose prompt is every
    valid token outside the loss mask; it differs from the causal loss."""
    b = make_batch()
    lc = LossConfig(mode="generative", gen_attention="prefix", gen_sub_batch=4)
    m, _ = jit_loss_and_grads(params, CFG, lc, b)
    prompt = b["gen_valid"] & (b["gen_loss"] == 0)

    @jax.jit
    def independent(params, b):
        hidden = forward(params, CFG, b["gen_ids"], b["gen_valid"], mode="prefix",
                         prompt=prompt).hidden
        return generative_loss(logits_fn(params, CFG, hidden), b["gen_ids"],
                               b["gen_loss"] * b["gen_valid"], "mixed", 4)

    np.testing.assert_allclose(float(m["loss_gen"]), float(independent(params, b)), rtol=1e-5)
    causal, _ = jit_loss_and_grads(params, CFG, LossConfig(mode="generative", gen_sub_batch=4), b)
    assert abs(float(causal["loss_gen"]) - float(m["loss_gen"])) > 1e-4


def test_context_attention_is_the_doc_cache_layout():
    """gen_attention='context': each row's leading document is read bidirectionally and the rest
    causally, exactly as doc-cached RAG reads it (the document's states from a bidirectional
    pass into a KV cache, the chat continued causally after it); float64. It differs from both
    the causal and the PrefixLM losses."""
    with jax.enable_x64(True):
        cfg = CFG.replace(dtype="float64", param_dtype="float64")
        params, b = init_params(cfg, seed=1), make_batch(n_gen=4)
        ctx = np.asarray([3, 5, 4, 0])  # the last row: no document (a plain chat)
        t = b["gen_ids"].shape[1]
        b["gen_context"] = np.arange(t)[None] < ctx[:, None]
        b["gen_loss"] = b["gen_loss"] * (np.arange(t)[None] >= 5)  # no loss on a document
        lc = LossConfig(mode="generative", gen_attention="context", gen_sub_batch=4)
        m, _ = jit_loss_and_grads(params, cfg, lc, b)

        hidden = []
        for i in range(len(ctx)):
            n = int(b["gen_valid"][i].sum())
            ids = jnp.asarray(b["gen_ids"][i:i + 1, :n])
            cache = KVCache.empty(cfg, 1, n)
            doc = forward(params, cfg, ids[:, :ctx[i]], mode="bidirectional", cache=cache)
            rest = forward(params, cfg, ids[:, ctx[i]:], mode="causal",
                           cache=doc.cache if ctx[i] else cache)
            h = jnp.concatenate([doc.hidden, rest.hidden], axis=1)
            hidden.append(jnp.pad(h, ((0, 0), (0, t - n), (0, 0))))
        ce = token_cross_entropy(logits_fn(params, cfg, jnp.concatenate(hidden)), b["gen_ids"])
        want = jnp.sum(ce * gen_weights(b, lc))  # training's per-token weights (float32)
        assert close64(float(m["loss_gen"]), float(want)), (float(m["loss_gen"]), float(want))
        for other in ("causal", "prefix"):
            o, _ = jit_loss_and_grads(params, cfg, LossConfig(
                mode="generative", gen_attention=other, gen_sub_batch=4), b)
            assert abs(float(o["loss_gen"]) - float(m["loss_gen"])) > 1e-4, other


def test_chunked_lm_head_equals_full_logits(params):
    b = make_batch()
    hidden = forward(params, CFG, b["gen_ids"], b["gen_valid"]).hidden
    full = token_cross_entropy(logits_fn(params, CFG, hidden), b["gen_ids"])
    chunked = token_ce(params, CFG, hidden, b["gen_ids"], chunk=7)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), atol=1e-5)


@pytest.mark.parametrize("variant", [dict(grad_cache_chunk=4), dict(grad_cache_chunk=2),
                                     dict(split_emb=True)])
def test_grad_cache_and_split_emb_equal_plain_gradients(variant):
    """Equal up to reduction order: checked in float64 (tests/tolerances.py)."""
    with jax.enable_x64(True):
        cfg = CFG.replace(dtype="float64", param_dtype="float64")
        params, b = init_params(cfg, seed=1), make_batch()
        plain_m, plain_g = jit_loss_and_grads(params, cfg, LossConfig(), b)
        m, g = jit_loss_and_grads(params, cfg, LossConfig(**variant), b)
        for k in plain_m:
            assert close64(float(m[k]), float(plain_m[k])), k
        jax.tree.map(lambda x, y: np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL), g, plain_g)
        assert float(plain_m["loss_rep"]) > 0 and float(plain_m["loss_gen"]) > 0


def _assert_equal64(got, want):
    (m, g), (m0, g0) = got, want
    for k in m0:
        assert close64(float(m[k]), float(m0[k])), (k, float(m[k]), float(m0[k]))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(
        np.asarray(x), np.asarray(y), rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL), g, g0)


@pytest.mark.parametrize("variant", [dict(gen_micro_batches=4), dict(emb_micro_batches=2),
                                     dict(gen_micro_batches=2, emb_micro_batches=4)])
def test_micro_batches_equal_the_full_batch(variant):
    """Accumulated micro-batches give the full batch's losses and gradients (float64): the
    generative weights are fixed by the whole batch, the embedding side keeps every passage a
    candidate."""
    with jax.enable_x64(True):
        cfg = CFG.replace(dtype="float64", param_dtype="float64")
        params, b = init_params(cfg, seed=1), make_batch()
        lc = dict(gen_sub_batch=4, gen_aggregation="mixed")
        _assert_equal64(jit_loss_and_grads(params, cfg, LossConfig(**lc, **variant), b),
                        jit_loss_and_grads(params, cfg, LossConfig(**lc), b))


def test_micro_batches_on_a_mesh_match_one_device():
    """Micro-batches on a mesh with data groups (2 x 2 x 2) equal one device without them."""
    assert_runs_equal64(_run64((2, 2, 2), gen_micro_batches=2, emb_micro_batches=2),
                        _run64(None), "micro-batches on (2, 2, 2)")


@pytest.mark.parametrize("variant", [{}, dict(split_emb=True), dict(emb_micro_batches=2)])
def test_one_sided_gradients_take_only_that_sides_path(variant):
    """emb_grad='query' ('passage') is the gradient through the query (passage) reps alone:
    checked against the loss as a function of two independent parameter copies, one per side."""
    with jax.enable_x64(True):
        cfg = CFG.replace(dtype="float64", param_dtype="float64")
        params, b = init_params(cfg, seed=1), make_batch()
        lc = LossConfig(mode="embedding", **variant)

        def two_copies(pq, pp):
            q = reps(pq, cfg, lc, b["query_ids"], b["query_valid"], b["query_pool"])
            p = reps(pp, cfg, lc, b["passage_ids"], b["passage_valid"], b["passage_pool"])
            return contrastive_loss(q, p, lc.temperature)

        loss, (via_q, via_p) = jax.jit(jax.value_and_grad(two_copies, argnums=(0, 1)))(
            params, params)
        m_q, g_q = jit_loss_and_grads(params, cfg, LossConfig(mode="embedding", emb_grad="query",
                                                          **variant), b)
        m_p, g_p = jit_loss_and_grads(params, cfg, LossConfig(mode="embedding", emb_grad="passage",
                                                          **variant), b)
        _assert_equal64((m_q, g_q), ({"loss_rep": loss}, via_q))
        _assert_equal64((m_p, g_p), ({"loss_rep": loss}, via_p))
        # The two sides differ and add up to the two-sided gradient.
        _, g_both = jit_loss_and_grads(params, cfg, lc, b)
        _assert_equal64(({}, jax.tree.map(jnp.add, g_q, g_p)), ({}, g_both))
        q_norm, p_norm = (float(optax_norm(g)) for g in (g_q, g_p))
        diff = float(optax_norm(jax.tree.map(jnp.subtract, g_q, g_p)))
        assert q_norm > 0 and p_norm > 0 and diff > 0.1 * min(q_norm, p_norm)


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))


def test_projection_head_is_trained():
    """With projection_dim the contrastive loss is over the head's outputs, and the head gets a
    gradient."""
    cfg = CFG.replace(projection_dim=8)
    p, b = init_params(cfg, seed=1), make_batch()
    lc = LossConfig(mode="embedding")
    q = reps(p, cfg, lc, b["query_ids"], b["query_valid"], b["query_pool"])
    assert q.shape == (8, 8)
    m, g = jit_loss_and_grads(p, cfg, lc, b)
    assert float(m["loss_rep"]) > 0 and float(optax_norm(g["projection"])) > 0


def test_modes(params):
    b = make_batch()
    emb, _ = jit_loss_and_grads(params, CFG, LossConfig(mode="embedding"), b)
    gen, _ = jit_loss_and_grads(params, CFG, LossConfig(mode="generative"), b)
    both, _ = jit_loss_and_grads(params, CFG, LossConfig(lambda_gen=0.5), b)
    assert float(emb["loss_gen"]) == 0 and float(gen["loss_rep"]) == 0
    np.testing.assert_allclose(float(both["loss"]),
                               float(emb["loss_rep"]) + 0.5 * float(gen["loss_gen"]), rtol=1e-6)


def test_invalid_loss_config():
    with pytest.raises(ValueError, match="attn"):
        LossConfig(attn="bcbc")
    with pytest.raises(ValueError, match="gen_aggregation='median'"):
        LossConfig(gen_aggregation="median")
    with pytest.raises(ValueError, match="gen_attention='bidirectional'"):
        LossConfig(gen_attention="bidirectional")
    with pytest.raises(ValueError, match="emb_grad='q'"):
        LossConfig(emb_grad="q")
    with pytest.raises(ValueError, match="not both"):
        LossConfig(emb_micro_batches=2, grad_cache_chunk=4)
    with pytest.raises(ValueError, match="micro_batches must be >= 1"):
        LossConfig(gen_micro_batches=0)


def _run(params, mesh_shape, steps=2, cfg=CFG, **overrides):
    """Metrics of `steps` train steps on one device (mesh_shape None) or a mesh, and the state."""
    tx, schedule = make_optimizer(1e-3, total_steps=10, warmup_ratio=0.1)
    lc = LossConfig(gen_sub_batch=4, **{**LC_OVERRIDES, **overrides})
    if mesh_shape is None:
        step = jax.jit(lambda s, b: train_step(s, b, config=cfg, lc=lc, tx=tx, schedule=schedule))
        state = init_state(params, tx)
    else:
        mesh = sharding.make_mesh(mesh_shape)
        sh = state_shardings(cfg, tx, mesh)
        step = jit_train_step(cfg, lc, tx, schedule, mesh, sh)
        state = jax.device_put(init_state(jax.tree.map(jnp.array, params), tx), sh)
    history = []
    for s in range(steps):
        with sharding.activate(mesh) if mesh_shape is not None else contextlib.nullcontext():
            state, m = step(state, make_batch(seed=s))
        history.append({k: float(v) for k, v in m.items()})
    return state, history


def _run64(mesh_shape, cfg=CFG, steps=2, **overrides):
    """_run in float64 (see tests/tolerances.py), from the same seed; host copies back."""
    with jax.enable_x64(True):
        cfg = cfg.replace(dtype="float64", param_dtype="float64")
        state, hist = _run(init_params(cfg, seed=1), mesh_shape, steps, cfg=cfg, **overrides)
        layers = state["params"]["layers"]
        placed = {"q_devices": len(layers["attn"]["q"].sharding.device_set),
                  "shards": {k: v.addressable_shards[0].data.shape
                             for k, v in layers.get("moe", layers.get("mlp")).items()}}
        return jax.tree.map(np.asarray, state["params"]), hist, placed


def assert_runs_equal64(got, want, what):
    (p1, h1, _), (p0, h0, _) = got, want
    for a, b in zip(h1, h0):
        for k in a:
            assert close64(a[k], b[k]), (what, k, a[k], b[k])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=FLOAT64_RTOL,
                                                         atol=FLOAT64_ATOL), p1, p0)


@pytest.fixture(scope="module")
def single_device_run():
    return _run64(None)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_meshes_match_one_device(single_device_run, mesh_shape):
    run = _run64(mesh_shape)
    assert_runs_equal64(run, single_device_run, mesh_shape)
    assert run[2]["q_devices"] == 8  # really partitioned


def test_loss_falls_on_a_fixed_batch(params):
    tx, schedule = make_optimizer(3e-3, total_steps=30, warmup_ratio=0.0)
    step = jax.jit(lambda s, b: train_step(s, b, config=CFG, lc=LossConfig(), tx=tx,
                                           schedule=schedule))
    state, b = init_state(params, tx), make_batch()
    first = None
    for _ in range(15):
        state, m = step(state, b)
        first = first or {k: float(v) for k, v in m.items()}
    assert float(m["loss_rep"]) < 0.5 * first["loss_rep"]
    assert float(m["loss_gen"]) < first["loss_gen"]


def test_shard_chunks_take_a_slice_of_every_shard_and_invert():
    a = np.arange(32 * 3).reshape(32, 3)
    c = np.asarray(shard_chunks(jnp.asarray(a), chunks=2, shards=4))
    assert c.shape == (2, 16, 3)
    # Shard k owns rows 8k..8k+7; chunk 0 takes the first 4 of each shard's block.
    np.testing.assert_array_equal(c[0, :, 0] // 3, [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19,
                                                   24, 25, 26, 27])
    np.testing.assert_array_equal(np.asarray(unshard_chunks(jnp.asarray(c), 4)), a)


CHUNKED = dict(grad_cache_chunk=8, logits_chunk=32)


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 4, 1)])
def test_chunked_step_on_8_devices_matches_one_device(mesh_shape):
    """GradCache and LM-head chunks on a mesh (with a data axis: each data group's chunk
    gradients summed once per step, see train_step.per_group) equal one device, in float64."""
    assert_runs_equal64(_run64(mesh_shape, **CHUNKED), _run64(None, **CHUNKED), mesh_shape)


def test_chunked_work_is_split_over_devices(params):
    """GradCache chunks and LM-head chunks take every device's own rows: per-device matmul FLOPs
    of the 8-device program are an eighth of one device's (replicated chunks would not be)."""
    tx, schedule = make_optimizer(1e-3, total_steps=10, warmup_ratio=0.1)
    lc = LossConfig(gen_sub_batch=4, **CHUNKED)
    state, batch = init_state(params, tx), make_batch()
    one = jax.jit(lambda s, b: train_step(s, b, config=CFG, lc=lc, tx=tx, schedule=schedule))
    single = hlo_cost.analyze(one.lower(state, batch).compile().as_text())["flops"]
    mesh = sharding.make_mesh((1, 8, 1))
    sh = state_shardings(CFG, tx, mesh)
    step = jit_train_step(CFG, lc, tx, schedule, mesh, sh)
    with sharding.activate(mesh):
        text = step.lower(jax.device_put(state, sh), batch).compile().as_text()
    per_device = hlo_cost.analyze(text, devices=8)
    assert per_device["unresolved_loops"] == 0
    assert single / 8 <= per_device["flops"] < 1.1 * single / 8, (single, per_device["flops"])
