"""Mixture of experts: routing and balancing loss equal transformers', the grouped kernels equal
the dense reference (values and gradients), the expert-parallel step equals one device."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grit_jax import moe
from grit_jax.config import ModelConfig, tiny_config
from grit_jax.model import KVCache, forward, init_params
from tests.test_train_step import _run64, assert_runs_equal64

KERNELS = ("tiled", "ragged", "megablox")


def kernel_fn(name):
    """The kernel; megablox in the Pallas interpreter (its Mosaic kernels need a TPU)."""
    if name == "megablox":
        return partial(moe.experts_megablox, interpret=True)
    return moe.KERNELS[name]


def routed_inputs(n, d, m, n_exp, k, seed=0, skew=0.0):
    """Tokens, routing (from a random router; `skew` starves the last experts) and weights."""
    rng = np.random.RandomState(seed)
    x = jnp.asarray(rng.randn(n, d), jnp.float32)
    logits = x @ jnp.asarray(rng.randn(d, n_exp) / np.sqrt(d), jnp.float32)
    logits = logits - skew * (jnp.arange(n_exp) >= n_exp // 2)
    top_w, top_i = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), k)
    top_w = top_w / top_w.sum(-1, keepdims=True)
    w = [jnp.asarray(rng.randn(*s) / np.sqrt(s[1]), jnp.float32)
         for s in ((n_exp, d, m), (n_exp, d, m), (n_exp, m, d))]
    return x, top_w, top_i, w


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n,n_exp,k,skew", [(37, 5, 2, 0.0), (64, 8, 2, 3.0), (9, 3, 1, 0.0),
                                            (1, 4, 2, 0.0), (200, 6, 3, 6.0)])
def test_grouped_kernels_equal_dense_reference(kernel, n, n_exp, k, skew):
    x, top_w, top_i, (g, u, dn) = routed_inputs(n, 16, 24, n_exp, k, seed=n, skew=skew)
    want = moe.experts_dense(x, top_w, top_i, g, u, dn)
    got = kernel_fn(kernel)(x, top_w, top_i, g, u, dn)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=1e-5)
    if skew > 2:  # some experts receive nothing: empty segments must be handled
        assert len(np.unique(np.asarray(top_i))) < n_exp


@pytest.mark.parametrize("kernel", ["tiled:1", "tiled:4", "tiled:128", "ragged", "megablox"])
def test_grouped_kernel_gradients_equal_dense(kernel):
    x, top_w, top_i, w = routed_inputs(50, 16, 24, 5, 2, seed=3, skew=1.0)

    def loss(kernel, x, top_w, *w):
        return jnp.sum(jnp.sin(kernel(x, top_w, top_i, *w)))

    name, _, tile = kernel.partition(":")
    fast = partial(moe.experts_tiled, tile=int(tile)) if tile else kernel_fn(name)
    args = (0, 1, 2, 3, 4)  # tokens, routing weights, gate, up, down
    want = jax.grad(lambda *a: loss(moe.experts_dense, *a), argnums=args)(x, top_w, *w)
    got = jax.grad(lambda *a: loss(fast, *a), argnums=args)(x, top_w, *w)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-6, rtol=1e-5)


def test_assignments_to_other_devices_experts_are_ignored():
    """The expert-parallel contract: ids outside [0, E_local) contribute nothing."""
    x, top_w, top_i, (g, u, dn) = routed_inputs(40, 16, 24, 6, 2, seed=5)
    lo = 2  # this "device" holds experts 2 and 3 of 6
    local = (top_i >= lo) & (top_i < lo + 2)
    want = moe.experts_dense(x, top_w * local, jnp.where(local, top_i, 0), g, u, dn)
    for kernel in ("dense", *KERNELS):
        got = kernel_fn(kernel)(x, top_w, top_i - lo, g[lo:lo + 2], u[lo:lo + 2], dn[lo:lo + 2])
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("n_exp,k", [(5, 2), (3, 1), (4, 4)])
def test_moe_block_equals_transformers_mixtral_block(n_exp, k):
    import torch
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    d, m = 32, 40
    torch.manual_seed(n_exp * 10 + k)
    block = MixtralSparseMoeBlock(MixtralConfig(hidden_size=d, intermediate_size=m,
                                                num_local_experts=n_exp, num_experts_per_tok=k))
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) / np.sqrt(p.shape[-1]))
    x = torch.randn(3, 7, d)
    with torch.no_grad():
        want = block(x).numpy()
    gate_up = block.experts.gate_up_proj.detach().numpy()
    params = {"router": block.gate.weight.detach().numpy().T,
              "gate": gate_up[:, :m].transpose(0, 2, 1), "up": gate_up[:, m:].transpose(0, 2, 1),
              "down": block.experts.down_proj.detach().numpy().transpose(0, 2, 1)}
    from grit_jax.model import MoE

    for impl in ("dense", "tiled", "ragged"):
        cfg = tiny_config("mixtral", hidden_size=d, intermediate_size=m, num_experts=n_exp,
                          num_experts_per_tok=k, moe_impl=impl)
        got, stats = MoE(cfg).apply({"params": params}, jnp.asarray(x.numpy()),
                                    jnp.ones((3, 7), bool))
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=1e-5)
        assert float(stats.counts.sum()) == 3 * 7 * k and float(stats.tokens) == 21


def test_load_balancing_loss_equals_transformers():
    import torch
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    rng = np.random.RandomState(0)
    layers, b, t, n_exp, k = 3, 4, 6, 5, 2
    logits = rng.randn(layers, b * t, n_exp).astype(np.float32) * 2
    valid = np.ones((b, t), bool)
    valid[1, 4:] = valid[3, 1:] = False
    stats = []
    for layer in logits:
        probs = jax.nn.softmax(jnp.asarray(layer), axis=-1)
        stats.append(moe.router_stats(probs, jax.lax.top_k(probs, k)[1], jnp.asarray(valid)))
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *stats)
    got = float(moe.load_balancing_loss(stacked))
    want = float(load_balancing_loss_func(tuple(torch.tensor(x) for x in logits), n_exp, k,
                                          torch.tensor(valid.astype(np.int64))))
    assert got == pytest.approx(want, rel=1e-6)
    fractions = np.asarray(moe.expert_fractions(stacked, k))
    assert fractions.sum() == pytest.approx(1.0, abs=1e-6)
    # Uniform routing gives exactly top_k.
    uniform = moe.RouterStats(jnp.full((2, 4), 3.0), jnp.full((2, 4), 1.5), jnp.full((2,), 6.0))
    assert float(moe.load_balancing_loss(uniform)) == pytest.approx(2.0)


MOE = tiny_config("mixtral", vocab_size=512, hidden_size=64, intermediate_size=96, num_layers=2,
                  num_heads=8, num_kv_heads=4, num_experts=8, num_experts_per_tok=2,
                  router_aux_loss_coef=0.02)


@pytest.fixture(scope="module")
def moe_params():
    return init_params(MOE, seed=1)


def test_mixtral_modes_differ_and_cache_decodes(moe_params):
    run = jax.jit(forward, static_argnums=(1,), static_argnames=("mode",))
    ids = jnp.asarray(np.random.RandomState(0).randint(3, 512, (2, 9)), jnp.int32)
    causal = run(moe_params, MOE, ids, mode="causal").hidden
    bidir = run(moe_params, MOE, ids, mode="bidirectional").hidden
    assert float(jnp.abs(causal - bidir)[:, 0].max()) > 1e-3  # the first token sees the rest
    out = run(moe_params, MOE, ids[:, :6], mode="causal", cache=KVCache.empty(MOE, 2, 12))
    hidden = [out.hidden]
    for i in range(6, 9):
        out = run(moe_params, MOE, ids[:, i:i + 1], mode="causal", cache=out.cache)
        hidden.append(out.hidden)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(hidden, axis=1)), np.asarray(causal),
                               atol=2e-5)


@pytest.fixture(scope="module")
def moe_single_device_run():
    return _run64(None, cfg=MOE)


def test_train_step_reports_balancing_loss(moe_single_device_run):
    m = moe_single_device_run[1][0]
    fractions = [m[f"expert_frac_{i}"] for i in range(8)]
    assert sum(fractions) == pytest.approx(1.0, abs=1e-12)
    assert 1.9 < m["loss_aux"] < 4.0  # 2 is perfectly balanced, 8 fully collapsed (top-2 of 8)
    assert m["loss"] == pytest.approx(m["loss_rep"] + m["loss_gen"] + 0.02 * m["loss_aux"],
                                      rel=1e-12)


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 2, "expert": 2, "tensor": 2},
                                        {"data": 2, "expert": 4}])
def test_expert_parallel_step_equals_one_device(moe_single_device_run, mesh_shape):
    """Expert parallelism (each device holds only its experts) equals one device, in float64
    (tests/tolerances.py)."""
    run = _run64(mesh_shape, cfg=MOE)
    assert_runs_equal64(run, moe_single_device_run, mesh_shape)
    gate_shard = run[2]["shards"]["gate"]
    assert gate_shard[1] == 8 // mesh_shape["expert"]  # each device holds only its experts


def test_bad_moe_configs_name_the_field():
    with pytest.raises(ValueError, match="num_experts_per_tok=3"):
        tiny_config("mixtral", num_experts=2, num_experts_per_tok=3)
    with pytest.raises(ValueError, match="num_experts=0"):
        tiny_config("mixtral", num_experts=0)
    with pytest.raises(ValueError, match="family='mistral'"):
        ModelConfig(num_experts=4)
    with pytest.raises(ValueError, match="moe_impl='fast'"):
        tiny_config("mixtral", moe_impl="fast")
    with pytest.raises(ValueError, match="megablox.*needs a TPU"):
        moe.resolve_impl("megablox", "cpu")
    assert (moe.resolve_impl("auto", "tpu") == "megablox"
            and moe.resolve_impl("auto", "cpu") == "tiled")
    from configs import tiny
    from grit_jax import sharding, trainer

    c = tiny.get_config()
    mesh = sharding.make_mesh({"expert": 4, "fsdp": 2})
    with pytest.raises(ValueError, match="model.num_experts=6 is not divisible by mesh.expert=4"):
        trainer.validate(c, mesh, tiny_config("mixtral", num_experts=6))
    with pytest.raises(ValueError, match="model.moe_impl='megablox' needs a TPU"):
        trainer.validate(c, mesh, tiny_config("mixtral", moe_impl="megablox", num_experts=8))
