"""grit_jax.aot.cost: loop-aware FLOPs and bytes of compiled XLA programs, checked on the CPU
against exact hand counts and against XLA's own cost analysis of loop-free programs."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from grit_jax.aot import cost as hlo_cost


def compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile()


def xla_flops(c):
    cost = c.cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


def mm(m, k, n):
    return 2.0 * m * k * n


def nested(x, w):
    def outer(c, _):
        def inner(c2, _):
            return jnp.tanh(c2 @ w), None
        return jax.lax.scan(inner, c, None, length=3)[0], None
    return jax.lax.scan(outer, x, None, length=5)[0].sum()


def test_nested_scans_and_their_gradient_count_every_iteration():
    x, w = jnp.ones((64, 128)), jnp.ones((128, 128))
    fwd = hlo_cost.analyze(compiled(nested, x, w).as_text())
    assert fwd["flops"] == 15 * mm(64, 128, 128)
    assert fwd["loops"] == 2 and fwd["loop_trips"] == [3, 5] and fwd["unresolved_loops"] == 0
    c = compiled(jax.grad(nested, argnums=1), x, w)
    grad = hlo_cost.analyze(c.as_text())
    # Forward 15 matmuls; backward two per step (input and weight gradients).
    assert grad["flops"] == 45 * mm(64, 128, 128)
    # XLA's cost analysis sees each loop body once: a small fraction of the program.
    assert xla_flops(c) < grad["flops"] / 10


def test_loop_with_a_nonzero_start():
    def f(x, w):
        return jax.lax.fori_loop(2, 9, lambda i, c: jnp.sin(c @ w), x).sum()
    r = hlo_cost.analyze(compiled(f, jnp.ones((16, 32)), jnp.ones((32, 32))).as_text())
    assert r["loop_trips"] == [7] and r["flops"] == 7 * mm(16, 32, 32)


def test_loop_that_steps_by_two():
    """XLA's windowed einsum loops (the weight all-gather fused into the matmul on TPU) count
    their induction variable up by 2: the trips are (bound - start) / step, not the bound."""
    def f(x, w):
        def body(c):
            return c[0] + 2, jnp.sin(c[1] @ w)
        return jax.lax.while_loop(lambda c: c[0] < 16, body, (jnp.int32(0), x))[1].sum()
    text = compiled(f, jnp.ones((16, 32)), jnp.ones((32, 32))).as_text()
    # XLA:CPU annotates this loop's trip count; TPU's windowed einsum loops carry none.
    text = re.sub(r'"known_trip_count":\{"n":"\d+"\}', "", text)
    r = hlo_cost.analyze(text)
    assert r["loop_trips"] == [8] and r["flops"] == 8 * mm(16, 32, 32)
    assert r["unresolved_loops"] == 0


def test_loop_free_programs_agree_with_xla():
    def f(a, b, c):  # batched dot, a transposed contraction, and a 2-D convolution
        y = jnp.einsum("bij,bjk->bik", a, b).sum(0)
        z = jax.lax.conv_general_dilated(c, jnp.ones((16, 8, 3, 3)), (1, 1), "SAME")
        return y.sum() + (a[0].T @ a[1]).sum() + z.sum()
    a, b, c = jnp.ones((4, 32, 48)), jnp.ones((4, 48, 24)), jnp.ones((2, 8, 20, 20))
    comp = compiled(f, a, b, c)
    r = hlo_cost.analyze(comp.as_text())
    # SAME padding: the 3 taps of each spatial dimension read real input at 58 of 60 places.
    expected = 4 * mm(32, 48, 24) + mm(48, 32, 48) + 2.0 * 2 * 16 * 8 * 58 * 58
    assert r["loops"] == 0
    assert r["flops"] == pytest.approx(expected, rel=1e-9)
    # XLA also counts the elementwise and reduction work: a few percent on top.
    assert r["flops"] <= xla_flops(comp) < 1.05 * r["flops"]


def test_collectives_bytes_per_device():
    devices = np.array(jax.devices()[:8])
    mesh = jax.sharding.Mesh(devices, ("x",))
    x = jax.device_put(jnp.ones((8 * 64, 256)), NamedSharding(mesh, P("x")))

    def f(x):  # gather the rows everywhere, then all-reduce a product
        full = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))
        return (full.T @ x).sum()
    r = hlo_cost.analyze(compiled(f, x).as_text(), devices=8)
    # The all-gather hands each device the 7/8 of the (512, 256) float32 array it lacks.
    assert r["collective_bytes"] >= 7 / 8 * 512 * 256 * 4
    assert r["collective_s"] == r["collective_bytes"]  # ici_bw defaults to 1 B/s


def test_bytes_and_roofline_times():
    def f(x, w):
        return jnp.tanh(x @ w)
    r = hlo_cost.analyze(compiled(f, jnp.ones((256, 512)), jnp.ones((512, 128))).as_text(),
                         peak_flops=1e9, hbm_bw=1e8)
    # At least the operands and the result cross memory once.
    assert r["bytes"] >= 4 * (256 * 512 + 512 * 128 + 256 * 128)
    assert r["compute_s"] == pytest.approx(r["flops"] / 1e9)
    assert r["memory_s"] == pytest.approx(r["bytes"] / 1e8)
    assert max(r["compute_s"], r["memory_s"]) <= r["roofline_s"] <= r["compute_s"] + r["memory_s"]


def test_parser_reads_tuples_comments_and_layouts():
    text = """HloModule m

%body (p: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %p = (s32[], f32[8,8]{1,0:T(8,128)}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %one = s32[] constant(1)
  %n = s32[] add(%i, %one)
  %x = f32[8,8]{1,0:T(8,128)} get-tuple-element(%p), index=1
  %d = f32[8,8]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={1}
  ROOT %t = (s32[], /*index=1*/f32[8,8]{1,0}) tuple(%n, %d)
}

%cond (p: (s32[], f32[8,8])) -> pred[] {
  %p = (s32[], f32[8,8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %k = s32[] constant(10)
  ROOT %lt = pred[] compare(%i, %k), direction=LT
}

ENTRY %main (a: f32[8,8]) -> f32[8,8] {
  %a = f32[8,8]{1,0} parameter(0)
  %z = s32[] constant(0)
  %t = (s32[], f32[8,8]{1,0}) tuple(%z, %a)
  %w = (s32[], f32[8,8]{1,0}) while(%t), condition=%cond, body=%body
  ROOT %r = f32[8,8]{1,0} get-tuple-element(%w), index=1
}
"""
    r = hlo_cost.analyze(text)
    assert r["loop_trips"] == [10] and r["flops"] == 10 * mm(8, 8, 8)
    with pytest.raises(ValueError, match="no ENTRY"):
        hlo_cost.analyze(text.replace("ENTRY ", ""))


def test_tpu_grouped_matmul_sparsecore_and_commented_operands():
    """A v5p program: a SparseCore computation closes with '}, execution_thread=...', operands
    carry /*index=N*/ comments, and grouped matmuls are custom calls counted at their full rows."""
    text = """HloModule m

%sc (a: f32[4], b: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %b = f32[4]{0} parameter(1)
  ROOT %s = f32[4]{0} add(%a, %b)
}, execution_thread="sparsecore"

ENTRY %main (g: s32[2], x: bf16[64,32], w: bf16[2,32,48]) -> bf16[64,48] {
  %g = s32[2]{0} parameter(0)
  %x = bf16[64,32]{1,0} parameter(1)
  %w = bf16[2,32,48]{2,1,0} parameter(2)
  ROOT %r = bf16[64,48]{1,0:T(8,128)(2,1)} custom-call(%g, %g, %g, %g, %g, /*index=5*/%x, %w), \
custom_call_target="tpu_custom_call", frontend_attributes={ragged_dot_tiling="128,32,48"}
}
"""
    r = hlo_cost.analyze(text)
    assert r["flops"] == r["kernel_flops"] == mm(64, 32, 48)
    assert r["bytes"] == 2 * (64 * 48 + 64 * 32 + 2 * 32 * 48) + 4 * 5 * 2
    # A Pallas kernel states its own cost in its backend config.
    pallas = text.replace('frontend_attributes={ragged_dot_tiling="128,32,48"}',
                          'backend_config={"custom_call_config": {"body": "x", "cost_estimate": '
                          '{"flops": "1000", "transcendentals": "0", "bytes_accessed": "64"}}}')
    r = hlo_cost.analyze(pallas)
    assert r["flops"] == r["kernel_flops"] == 1000 and r["bytes"] == 64
