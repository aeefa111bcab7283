"""Grouped-query attention kernels: splash (TPU), XLA's call, a blocked CPU kernel, and float64.

Which kernel runs (``attention_impl``, resolved per call by ``resolve``):

- ``splash``: the Pallas splash-attention kernel (``jax.experimental.pallas.ops.tpu``), the TPU
  default for self-attention without a cache (every training pass, embeddings, prefill). It
  never writes the (T, S) scores to HBM and skips the key blocks a causal or sliding-window
  mask removes, so causal costs about half of bidirectional. Padding enters as segment ids
  (valid tokens 1, padding 0), key/value heads are shared by their query group (GQA) inside the
  kernel, and on a mesh it runs under ``shard_map`` over the batch and head axes.
  ``splash_interpret`` is the same kernel in the Pallas interpreter (any backend, slow: tests).
- ``xla``: ``jax.nn.dot_product_attention`` with an explicit boolean mask (cuDNN on GPU; on TPU
  XLA's plain attention, with float32 scores in HBM). Used for calls with a KV cache (decode
  steps, cached prefixes) and where splash cannot run.
- ``blocked``: the CPU default (XLA:CPU's call materialises the scores and runs the softmax at
  memory speed); one (sequence, key/value head, query block) at a time with a flash-style
  backward (benchmarks/attention_cpu.py). Causal calls (a ``CausalMask``) read, per query block,
  only the keys the mask lets it see; bidirectional calls (a ``KeyMask``) add a per-key bias
  instead of reading a (T, S) mask.
- float64 inputs always take an explicit float64 softmax (parity checks).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from grit_jax.sharding import batch_axes

BLOCK = 256  # query rows per block: with S keys the scores block is (heads per group, 256, S)
MIN_BLOCKED_QUERIES = 64  # shorter (decode steps, short prompts): XLA's call, no loop overhead
SPLASH_IMPLS = ("splash", "splash_interpret")
SPLASH_LANES = 128  # splash block sizes (and so padded lengths) are multiples of this
NEG = float(jnp.finfo(jnp.float32).min)  # the score of a hidden key


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SelfMask:
    """A self-attention mask by its parts, for kernels that build their own (splash).

    Queries and keys are the same right-padded tokens at positions ``arange(T)``: ``valid``
    (B, T) marks real tokens, ``mode`` is causal or bidirectional and ``window`` the sliding
    window (causal mode only). ``dense()`` gives the (B, 1, T, T) boolean mask of the others.
    """

    valid: jax.Array
    mode: str = dataclasses.field(metadata=dict(static=True))
    window: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    def dense(self) -> jax.Array:
        """The boolean (B, 1, T, T) mask (as ``grit_jax.model.attention_mask``)."""
        t = self.valid.shape[1]
        allowed = jnp.broadcast_to(self.valid[:, None, :].astype(bool),
                                   (self.valid.shape[0], t, t))
        if self.mode == "causal":
            diff = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]
            keep = diff >= 0
            if self.window is not None:
                keep = keep & (diff < self.window)
            allowed = allowed & keep[None]
        return allowed[:, None]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KeyMask:
    """A mask that depends on the key alone (bidirectional attention): every query sees exactly
    the ``valid`` (B, S) keys. The blocked kernel adds a per-key bias instead of reading a dense
    (T, S) mask when there are several query blocks (a quarter less time at 4,000 tokens); other
    kernels, and shorter calls, take ``dense``."""

    valid: jax.Array

    def dense(self, queries: int) -> jax.Array:
        """The boolean (B, 1, queries, S) mask (as ``grit_jax.model.attention_mask``)."""
        b, s = self.valid.shape
        return jnp.broadcast_to(self.valid.astype(bool)[:, None, None, :], (b, 1, queries, s))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CausalMask:
    """A dense causal (B, 1, T, S) mask and what it is known to hide, for kernels that can skip
    keys (blocked): query i sees no key slot at or past ``i + reach`` (self-attention: 1; after
    a KV cache of S slots: S - T + 1), nor, with a sliding ``window``, at or before ``i - window``.
    """

    allowed: jax.Array
    reach: int = dataclasses.field(metadata=dict(static=True))
    window: int | None = dataclasses.field(default=None, metadata=dict(static=True))


def resolve(impl: str, queries: int, platform: str | None = None, *,
            self_attention: bool = True) -> str:
    """The kernel ``impl`` means for ``queries`` query rows on ``platform`` (default: the
    default backend's; ahead-of-time compilation for TPUs traces on a CPU host and pins the
    target's kernel with ``for_platform``). ``self_attention``: no cache and default positions
    (splash builds its masks from a SelfMask; other calls take XLA's kernel instead)."""
    if impl == "auto":
        platform = platform or jax.default_backend()
        if platform == "cpu":
            return "blocked" if queries >= MIN_BLOCKED_QUERIES else "xla"
        impl = "splash" if platform == "tpu" else "xla"
    if impl in SPLASH_IMPLS and not self_attention:
        return "xla"
    return impl


def for_platform(impl: str, platform: str) -> str:
    """``auto`` pinned for a target platform: ``splash`` on TPU, ``xla`` on GPU, ``auto`` (blocked
    or XLA by length) on CPU."""
    if impl != "auto" or platform == "cpu":
        return impl
    return "splash" if platform == "tpu" else "xla"


def check_platform(impl: str, platform: str) -> None:
    """Refuse kernels that cannot compile for the platform, naming the choice that can."""
    if impl == "splash" and platform != "tpu":
        raise ValueError(f"attention_impl='splash' needs a TPU (this backend: {platform}); use "
                         f"'auto', 'xla', 'blocked', or 'splash_interpret' (the same kernel in the "
                         f"Pallas interpreter, slow)")


def attention(q, k, v, mask, scale: float, impl: str = "auto"):
    """softmax(q k^T * scale, masked) v for q (B, T, H, D), k/v (B, S, G, D).

    ``mask``: a boolean (B, 1, T, S) array, a SelfMask (self-attention, T == S), a KeyMask
    (bidirectional) or a CausalMask. Float64 inputs take an explicit float64 softmax (XLA's call
    always takes it in float32).
    """
    is_self = isinstance(mask, SelfMask)
    kernel = resolve(impl, q.shape[1], self_attention=is_self)
    if kernel in SPLASH_IMPLS and q.dtype != jnp.float64:
        return splash_attention(q, k, v, mask, scale, interpret=kernel == "splash_interpret")
    reach = window = None
    if is_self:
        if mask.mode == "causal":
            reach, window, mask = 1, mask.window, mask.dense()
        else:
            mask = KeyMask(mask.valid)
    if isinstance(mask, CausalMask):
        reach, window, mask = mask.reach, mask.window, mask.allowed
    elif isinstance(mask, KeyMask) and (kernel != "blocked" or q.dtype == jnp.float64
                                        or q.shape[1] <= BLOCK):
        # The bias pays off over several query blocks; at one block (the demo's short training
        # sequences) it was not faster, and the demo's training measured slower with it.
        mask = mask.dense(q.shape[1])
    if q.dtype == jnp.float64:
        return float64_attention(q, k, v, mask, scale)
    if kernel == "blocked":
        return blocked_attention(q, k, v, mask, scale, reach=reach, window=window)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)


def splash_block(length: int) -> int:
    """Splash block size for a padded length (a multiple of 128): 512 where it divides."""
    return next(b for b in (512, 256, SPLASH_LANES) if length % b == 0)


def _splash_kernel(heads: int, length: int, mode: str, window: int | None, interpret: bool):
    """The splash kernel for one sequence of ``length`` (padded) tokens and ``heads`` query heads.

    Made anew in every trace: it holds its mask tables as arrays, which must not outlive the
    trace (the numpy work behind them is cached by the splash module itself)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (length, length)
    if mode == "bidirectional":
        mask = sa.FullMask(shape)
    elif window is None or window >= length:
        mask = sa.CausalMask(shape)
    else:  # q - k < window, k <= q
        mask = sa.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    b = splash_block(length)
    blocks = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                           block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    # Its residuals (output, log-sum-exp) are named "context", so the remat policies that keep
    # the attention output keep them too (grit_jax.model.REMAT).
    return sa.make_splash_mha(sa.MultiHeadMask([mask] * heads), block_sizes=blocks,
                              head_shards=1, q_seq_shards=1, interpret=interpret,
                              residual_checkpoint_name="context")


def splash_attention(q, k, v, mask: SelfMask, scale: float, interpret: bool = False):
    """Self-attention with the splash kernel: q (B, T, H, D), k/v (B, T, G, D).

    Lengths are padded to a multiple of 128 (padding is segment 0, like the input's own right
    padding, so real tokens never see it); on a mesh the kernel runs per device under
    shard_map, each device taking its batch rows and (when they divide) its heads.
    """
    b, t, h, _ = q.shape
    g = k.shape[2]
    pad = -t % SPLASH_LANES
    seg = mask.valid.astype(jnp.int32)
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        seg = jnp.pad(seg, ((0, 0), (0, pad)))
    q = q * jnp.asarray(scale, q.dtype)

    def local(q, k, v, seg):
        from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

        kernel = _splash_kernel(q.shape[2], q.shape[1], mask.mode, mask.window, interpret)
        one = lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(s, s))  # noqa: E731
        heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
        out = jax.vmap(one)(heads_first(q), heads_first(k), heads_first(v), seg)
        return heads_first(out)

    # The scope names the mask: grit_jax.aot.cost prices the kernel by the blocks it leaves.
    scope = f"splash[{mask.mode}" + (f",window={mask.window}]" if mask.window else "]")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        with jax.named_scope(scope):
            out = local(q, k, v, seg)
    else:
        axes = tuple(a for a in batch_axes() if a in mesh.axis_names)
        rows = axes if b % math.prod(mesh.shape[a] for a in axes) == 0 else None
        tp = mesh.shape.get("tensor", 1)
        heads = "tensor" if tp > 1 and h % tp == 0 and g % tp == 0 else None
        spec = P(rows, None, heads, None)
        with jax.named_scope(scope):
            out = jax.shard_map(local, in_specs=(spec, spec, spec, P(rows, None)), out_specs=spec,
                                check_vma=False)(q, k, v, seg)  # Pallas outputs: no vma type
    return out[:, :t]


def float64_attention(q, k, v, mask, scale):
    """Grouped-query attention entirely in float64."""
    b, t, h, d = q.shape
    g = k.shape[2]
    qg = q.reshape(b, t, g, h // g, d)
    logits = jnp.einsum("btgrd,bsgd->bgrts", qg, k) * scale
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bgrts,bsgd->btgrd", probs, v).reshape(b, t, h, d)


def blocked_attention(q, k, v, mask, scale, block: int = BLOCK, *, reach: int | None = None,
                      window: int | None = None):
    """Attention one (sequence, kv head, query block) at a time; float32 softmax as XLA's call.

    Each block keeps only its output and softmax normaliser for the backward pass, which
    recomputes the block's probabilities (flash-attention style, _block_attention). Fully masked
    query rows (padding) give finite outputs. ``reach``/``window`` (a causal mask, CausalMask):
    query i sees no key at or past ``i + reach`` nor at or before ``i - window``; each query
    block then reads only the keys in between, about half the work of causal self-attention.
    ``mask`` may be a KeyMask (bidirectional): a per-key bias replaces the dense mask.
    """
    t, s = q.shape[1], k.shape[1]
    if reach is None or t <= block or (window is None and block - 1 + reach >= s):
        return _blocked(q, k, v, mask, scale, block)
    outs = []
    for lo_q in range(0, t, block):  # a static key range per query block
        hi_q = min(lo_q + block, t)
        lo = 0 if window is None else min(max(0, lo_q - window + 1), s - 1)
        hi = max(min(s, hi_q - 1 + reach), lo + 1)
        outs.append(_blocked(q[:, lo_q:hi_q], k[:, lo:hi], v[:, lo:hi],
                             mask[:, :, lo_q:hi_q, lo:hi], scale, block))
    return jnp.concatenate(outs, axis=1)


def _blocked(q, k, v, mask, scale, block):
    """blocked_attention over the whole (T, S) mask: every query block reads every key."""
    b, t, h, d = q.shape
    s, g = k.shape[1], k.shape[2]
    r = h // g
    qb = min(block, t)
    nq = -(-t // qb)
    pad = nq * qb - t
    n = b * g * nq
    qs = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, nq, qb, g, r, d)
    qs = qs.transpose(0, 3, 1, 4, 2, 5).reshape(n, r, qb, d)
    if isinstance(mask, KeyMask):  # one additive bias row per block: 0 or NEG per key
        bias = jnp.where(mask.valid, 0.0, NEG).astype(jnp.float32)
        ms = jnp.broadcast_to(bias[:, None, None, None, :], (b, g, nq, 1, s)).reshape(n, 1, s)
    else:
        ms = jnp.pad(mask[:, 0], ((0, 0), (0, pad), (0, 0))).reshape(b, 1, nq, qb, s)
        ms = jnp.broadcast_to(ms, (b, g, nq, qb, s)).reshape(n, qb, s)

    def per_block(x):  # (b, s, g, d) -> (n, s, d): each block's sequence and head
        x = x.transpose(0, 2, 1, 3)[:, :, None]
        return jnp.broadcast_to(x, (b, g, nq, s, d)).reshape(n, s, d)

    def one(args):
        return _block_attention(*args, scale)

    out = jax.lax.map(one, (qs, per_block(k), per_block(v), ms))  # (n, r, qb, d)
    out = out.reshape(b, g, nq, r, qb, d).transpose(0, 2, 4, 1, 3, 5).reshape(b, nq * qb, h, d)
    return out[:, :t]


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _block_attention(q, k, v, mask, scale):
    """One block: q (R, Q, D), k/v (S, D), mask (Q, S) boolean or (1, S) additive -> (R, Q, D)."""
    return _block_forward(q, k, v, mask, scale)[0]


def _block_forward(q, k, v, mask, scale):
    """(output, log-sum-exp of each row's masked scores), softmax in float32."""
    scores = _masked(jnp.einsum("rqd,sd->rqs", q, k, preferred_element_type=jnp.float32) * scale,
                     mask)
    top = scores.max(-1, keepdims=True)
    p = jnp.exp(scores - top)
    total = p.sum(-1, keepdims=True)
    out = jnp.einsum("rqs,sd->rqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / total).astype(q.dtype), top + jnp.log(total)


def _masked(scores, mask):
    """Scores with hidden keys at NEG: a boolean (Q, S) mask selects, a float (1, S) bias adds
    (NEG plus any finite score rounds to NEG: no -inf, padded rows stay finite)."""
    if mask.dtype == jnp.bool_:
        return jnp.where(mask[None], scores, NEG)
    return scores + mask[None]


def _block_fwd(q, k, v, mask, scale):
    out, lse = _block_forward(q, k, v, mask, scale)
    return out, (q, k, v, mask, out, lse)


def _block_bwd(scale, res, g):
    """Gradients from the recomputed probabilities: dS = P * (dO V^T - rowsum(dO * O))."""
    q, k, v, mask, out, lse = res
    f32 = jnp.float32
    scores = jnp.einsum("rqd,sd->rqs", q, k, preferred_element_type=f32) * scale
    if mask.dtype == jnp.bool_:
        p = jnp.where(mask[None], jnp.exp(scores - lse), 0.0)
    else:  # an additive bias: NEG on hidden keys, whose probabilities come out 0
        p = jnp.exp(scores + mask[None] - lse)
    g32 = g.astype(f32)
    dv = jnp.einsum("rqs,rqd->sd", p, g32)
    dp = jnp.einsum("rqd,sd->rqs", g32, v.astype(f32))
    ds = p * (dp - jnp.sum(g32 * out.astype(f32), -1, keepdims=True)) * scale
    dq = jnp.einsum("rqs,sd->rqd", ds, k.astype(f32))
    dk = jnp.einsum("rqs,rqd->sd", ds, q.astype(f32))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_block_attention.defvjp(_block_fwd, _block_bwd)
