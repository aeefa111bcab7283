"""Routed experts (Mixtral): top-k router, dropless grouped expert matmuls, load-balancing loss.

Routing is transformers' Mixtral block exactly: router logits in float32, softmax over all
experts, top-k, the k weights renormalised to sum to 1. Every token reaches its k experts (no
capacity, nothing dropped). Three interchangeable kernels compute the experts:

``tiled``   sort-and-segment in plain JAX: each (token, expert) assignment is placed in its
            expert's segment of a buffer whose segments are padded to a whole number of row
            tiles, and a loop over tiles runs each tile through its one expert's SwiGLU. Work
            is ~(tokens x k) rows, whatever the backend. The default off TPU.
``ragged``  ``jax.lax.ragged_dot`` grouped matmuls over the sorted assignments. XLA:CPU lowers
            it to a masked dense product over all groups (only a reference there), and XLA:TPU
            its weight gradient likewise.
``megablox`` the Pallas grouped-matmul kernels (TPU), with their own weight-gradient kernel:
            the default on TPU, where ``ragged_dot``'s weight gradient is a dense product over
            all experts (8x the work for 8 experts; found by AOT-compiling GritLM-8x7B).
``dense``   every expert on every token, combined with the (mostly zero) routing weights: the
            simple reference the others are tested against, and the baseline of the benchmark.

Expert parallelism: with a mesh in scope whose ``expert`` axis is > 1 (it also splits the
batch), each device gathers the tokens of its expert group, runs the assignments that go to its
own experts, and a reduce-scatter returns every token's sum to the device that owns it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from grit_jax import sharding

IMPLS = ("tiled", "ragged", "megablox", "dense")


class RouterStats(NamedTuple):
    """Per-layer routing statistics over the valid tokens of one forward pass (leading axis:
    layers once stacked by the layer scan): top-k assignments and router probability per
    expert, and the number of valid tokens."""

    counts: jnp.ndarray  # (..., E) float32: how many of the k choices went to each expert
    probs: jnp.ndarray   # (..., E) float32: sum of softmax(router logits) per expert
    tokens: jnp.ndarray  # (...,) float32


# ----------------------------------------------------------------------------------------------
# Router and load balancing (pure functions)
# ----------------------------------------------------------------------------------------------
def route(x, router_w, k: int):
    """(probs (N, E), top-k weights (N, k) renormalised, top-k expert ids (N, k)) in float32
    (float64 for float64 models)."""
    dt = jnp.promote_types(x.dtype, jnp.float32)
    logits = jnp.dot(x.astype(dt), router_w.astype(dt))
    probs = jax.nn.softmax(logits, axis=-1)
    top_w, top_i = jax.lax.top_k(probs, k)
    return probs, top_w / jnp.sum(top_w, axis=-1, keepdims=True), top_i


def router_stats(probs, top_i, valid) -> RouterStats:
    """RouterStats of one layer; padding (valid == 0) is left out, as transformers does."""
    w = valid.reshape(-1).astype(probs.dtype)
    n_exp = probs.shape[-1]
    counts = jnp.sum(jax.nn.one_hot(top_i, n_exp, dtype=probs.dtype) * w[:, None, None],
                     axis=(0, 1))
    return RouterStats(counts, jnp.sum(probs * w[:, None], axis=0), jnp.sum(w))


def load_balancing_loss(stats: RouterStats):
    """Switch/Mixtral auxiliary loss over all layers: E * sum_e f_e * P_e.

    f_e: the fraction of (token, layer) rows whose top-k includes expert e (summed over the k
    choices), P_e: the mean router probability of e; both over valid tokens of every layer,
    which is transformers' ``load_balancing_loss_func`` with an attention mask. Equals top_k
    for perfectly uniform routing.
    """
    rows = jnp.maximum(jnp.sum(stats.tokens), 1.0)
    f = jnp.sum(stats.counts.reshape(-1, stats.counts.shape[-1]), axis=0) / rows
    p = jnp.sum(stats.probs.reshape(-1, stats.probs.shape[-1]), axis=0) / rows
    return f.shape[-1] * jnp.sum(f * p)


def expert_fractions(stats: RouterStats, top_k: int):
    """Share of all top-k assignments (valid tokens, all layers) that each expert received."""
    counts = jnp.sum(stats.counts.reshape(-1, stats.counts.shape[-1]), axis=0)
    return counts / jnp.maximum(jnp.sum(stats.tokens) * top_k, 1.0)


# ----------------------------------------------------------------------------------------------
# Expert kernels: y = sum_k w_k * SwiGLU_{e_k}(x), for experts [0, E_local) of the weights given
# ----------------------------------------------------------------------------------------------
def _swiglu(x, gate, up, down):
    return (jax.nn.silu(x @ gate) * (x @ up)) @ down


def _combine(y_assign, top_w, n, k, dtype):
    """(N*k, D) per-assignment outputs -> (N, D): routing-weighted sum over the k choices in
    float32 (transformers multiplies by the float32 weights too), cast to the compute dtype."""
    y = y_assign.astype(top_w.dtype).reshape(n, k, -1) * top_w[..., None]
    return jnp.sum(y, axis=1).astype(dtype)


def experts_dense(x, top_w, top_i, gate, up, down):
    """Reference: every local expert on every token; assignments to other experts count 0."""
    n_local = gate.shape[0]
    comb = jnp.sum(jax.nn.one_hot(top_i, n_local, dtype=top_w.dtype) * top_w[..., None], axis=1)
    y = jax.vmap(_swiglu, in_axes=(None, 0, 0, 0))(x, gate, up, down)  # (E, N, D)
    return jnp.einsum("end,ne->nd", y.astype(top_w.dtype), comb).astype(x.dtype)


def _segments(top_i, n_local: int):
    """Per assignment (N*k,): its expert (n_local for another device's), rank within its expert,
    and the per-expert assignment counts."""
    key = top_i.reshape(-1)
    key = jnp.where((key >= 0) & (key < n_local), key, n_local)
    one_hot = jax.nn.one_hot(key, n_local + 1, dtype=jnp.int32)
    rank = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)
    return key, rank, jnp.sum(one_hot, axis=0)[:n_local]


def tile_rows(assignments: int, n_local: int) -> int:
    """Rows per tile: a power of two near the mean assignments per expert, at most 128, so the
    segment padding (< one tile per expert) never exceeds the real rows."""
    mean = max(1, assignments // max(n_local, 1))
    return int(min(128, 2 ** int(math.log2(mean))))


def experts_tiled(x, top_w, top_i, gate, up, down, tile: int | None = None):
    """Dropless grouped SwiGLU: assignments laid out expert by expert in tiles, one expert per
    tile, and a scan over the tiles (a tile's weights are read by index, not copied per row)."""
    n, k = top_i.shape
    n_local, d = gate.shape[0], x.shape[-1]
    tile = tile or tile_rows(n * k, n_local)
    key, rank, sizes = _segments(top_i, n_local)
    tiles_per = -(-sizes // tile)
    first_tile = jnp.cumsum(tiles_per) - tiles_per  # (n_local,)
    n_tiles = -(-n * k // tile) + n_local  # static upper bound on sum(tiles_per)
    slot = jnp.where(key < n_local,
                     jnp.take(first_tile, jnp.minimum(key, n_local - 1)) * tile + rank,
                     n_tiles * tile)  # another device's assignment: dropped from the buffer
    rows = jnp.zeros((n_tiles * tile, d), x.dtype).at[slot].set(
        jnp.repeat(x, k, axis=0), mode="drop")
    # Expert of each tile; tiles past the used ones hold zero rows (SwiGLU(0) = 0).
    tile_expert = jnp.clip(jnp.searchsorted(first_tile + tiles_per, jnp.arange(n_tiles),
                                            side="right"), 0, n_local - 1)

    def one(args):
        xt, e = args
        return _swiglu(xt, gate[e], up[e], down[e])

    out = jax.lax.map(one, (rows.reshape(n_tiles, tile, d), tile_expert)).reshape(-1, d)
    y = out.at[slot].get(mode="fill", fill_value=0)
    return _combine(y, top_w, n, k, x.dtype)


def _sorted_swiglu(x, top_w, top_i, gate, up, down, matmul, row_multiple: int = 1):
    """SwiGLU through a grouped matmul ``matmul(rows, w, group_sizes)`` over the assignments
    sorted by expert (another device's last, zeroed: they are outside every group and get no
    gradient), rows padded to a multiple of ``row_multiple``; unsorted and combined."""
    n, k = top_i.shape
    n_local, m = gate.shape[0], n * k
    key, _, sizes = _segments(top_i, n_local)
    order = jnp.argsort(key, stable=True)
    local = (jnp.take(key, order) < n_local)[:, None]
    rows = jnp.where(local, jnp.take(x, order // k, axis=0), 0)
    rows = jnp.pad(rows, ((0, -m % row_multiple), (0, 0)))
    h = jax.nn.silu(matmul(rows, gate, sizes)) * matmul(rows, up, sizes)
    y = jnp.where(local, matmul(h, down, sizes)[:m], 0)
    y = jnp.zeros_like(y).at[order].set(y, unique_indices=True)
    return _combine(y, top_w, n, k, x.dtype)


def experts_ragged(x, top_w, top_i, gate, up, down):
    """Dropless grouped SwiGLU with ``jax.lax.ragged_dot`` over the expert-sorted assignments."""
    return _sorted_swiglu(x, top_w, top_i, gate, up, down, jax.lax.ragged_dot)


def _megablox_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """Row tile and one tile for both matrix dimensions: the backward pass reuses the tiling with
    k and n swapped, and Mosaic needs tiles that are multiples of 128 (the last tile of a
    dimension may be ragged) or whole dimensions."""
    small = min(k, n)
    t = next((t for t in (1024, 512, 256, 128) if t <= small), small)
    return (512 if m >= 4096 else 128), t, t


def experts_megablox(x, top_w, top_i, gate, up, down, interpret: bool = False):
    """Dropless grouped SwiGLU with the Pallas megablox kernels (TPU): ``gmm`` forward and for
    the input gradient, ``tgmm`` for the expert weights' gradient (XLA lowers the weight
    gradient of ``ragged_dot`` to a dense product over every expert). ``interpret``: run the
    kernels in the Pallas interpreter (any backend; for tests)."""
    from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

    def gmm(a, w, sizes):
        return megablox.gmm(a, w, sizes, a.dtype, _megablox_tiling(a.shape[0], *w.shape[1:]),
                            None, None, False, interpret)

    tm = _megablox_tiling(top_i.size, x.shape[-1], gate.shape[-1])[0]
    return _sorted_swiglu(x, top_w, top_i, gate, up, down, gmm, row_multiple=tm)


KERNELS = {"tiled": experts_tiled, "ragged": experts_ragged, "megablox": experts_megablox,
           "dense": experts_dense}


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """``auto`` -> ``megablox`` on TPU, ``tiled`` elsewhere (platform: default backend's).
    Given the platform explicitly, megablox elsewhere than on TPU is an error (its Mosaic
    kernels compile only for TPUs); ahead-of-time compilation for TPUs traces on a CPU host."""
    if impl == "auto":
        return "megablox" if (platform or jax.default_backend()) == "tpu" else "tiled"
    if impl == "megablox" and platform is not None and platform != "tpu":
        raise ValueError(f"moe_impl='megablox' needs a TPU (this backend: {platform}); use "
                         f"'auto', 'tiled', 'ragged' or 'dense'")
    return impl


# ----------------------------------------------------------------------------------------------
# The layer's expert computation, expert-parallel when the mesh has an expert axis
# ----------------------------------------------------------------------------------------------
def _mesh_axis(mesh, name) -> int:
    return mesh.shape.get(name, 1)


def experts(x, top_w, top_i, gate, up, down, impl: str = "auto"):
    """Routed SwiGLU experts for tokens x (N, D) with top-k weights/ids (N, k).

    gate/up (E, D, M), down (E, M, D). Outside a mesh this is the kernel itself; on a mesh, a
    shard_map in which every device handles the tokens of its expert group for its own experts
    and MLP slice.
    """
    kernel = KERNELS[resolve_impl(impl)]
    gate, up, down = (jnp.asarray(w) for w in (gate, up, down))
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(x, top_w, top_i, gate, up, down)
    # On a mesh, always shard_map: left to the partitioner, the data-dependent scatter of the
    # tiled kernel would gather every device's tokens everywhere.
    ep = _mesh_axis(mesh, "expert")
    n_exp, n = gate.shape[0], x.shape[0]
    pad = -n % math.prod(_mesh_axis(mesh, a) for a in sharding.BATCH_AXES)
    if pad:  # e.g. one token per step while decoding: zero-weight rows make the split even
        x, top_w, top_i = (jnp.pad(a, ((0, pad), (0, 0))) for a in (x, top_w, top_i))
    if n_exp % ep:
        raise ValueError(f"num_experts={n_exp} is not divisible by the mesh expert axis ({ep})")
    batch = P(sharding.BATCH_AXES)
    w_in, w_out = P("expert", "fsdp", "tensor"), P("expert", "tensor", "fsdp")

    def local(x, top_w, top_i, gate, up, down):
        # FSDP: this layer's expert weights, gathered along the embedding.
        gate, up = (jax.lax.all_gather(w, "fsdp", axis=1, tiled=True) for w in (gate, up))
        down = jax.lax.all_gather(down, "fsdp", axis=2, tiled=True)
        # The tokens of the whole expert group; ids relative to this device's first expert.
        x, top_w, top_i = (jax.lax.all_gather(a, "expert", axis=0, tiled=True)
                           for a in (x, top_w, top_i))
        top_i = top_i - jax.lax.axis_index("expert") * gate.shape[0]
        y = kernel(x, top_w, top_i, gate, up, down)
        y = jax.lax.psum(y, "tensor")  # each device holds a slice of the MLP width
        # Every expert shard's share of each token, summed and returned to its device.
        return jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)

    return jax.shard_map(local, in_specs=(batch, batch, batch, w_in, w_in, w_out),
                         out_specs=batch,
                         # Pallas outputs carry no varying-axes type; the same step with the
                         # check off equals one device too (checked with the tiled kernel).
                         check_vma=kernel is not experts_megablox)(
        x, top_w, top_i, gate, up, down)[:n]
