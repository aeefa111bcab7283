"""Grouped-query attention kernels: XLA's fused call, a blocked CPU kernel, and float64.

``jax.nn.dot_product_attention`` dispatches to cuDNN on GPU and to fused kernels on TPU, but on
XLA:CPU it materialises the (batch, heads, T, S) scores and runs the softmax over them at memory
speed (4-9x slower than PyTorch's SDPA at 512-4096 tokens). ``blocked_attention`` computes one
(sequence, key/value head, query block) at a time in a loop whose buffers stay cache-sized and
are reused, which removes most of that gap (benchmarks/attention_cpu.py).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

BLOCK = 256  # query rows per block: with S keys the scores block is (heads per group, 256, S)
MIN_BLOCKED_QUERIES = 64  # shorter (decode steps, short prompts): XLA's call, no loop overhead


def resolve(impl: str, queries: int, platform: str | None = None) -> str:
    """The kernel ``impl`` means for ``queries`` query rows on ``platform`` (default: the
    default backend's; ahead-of-time compilation for TPUs traces on a CPU host and passes it)."""
    if impl == "auto":
        cpu = (platform or jax.default_backend()) == "cpu"
        return "blocked" if cpu and queries >= MIN_BLOCKED_QUERIES else "xla"
    return impl


def for_platform(impl: str, platform: str) -> str:
    """``auto`` pinned for a target platform: ``xla`` off CPU (the AOT compiler's choice)."""
    return impl if impl != "auto" or platform == "cpu" else "xla"


def attention(q, k, v, mask, scale: float, impl: str = "auto"):
    """softmax(q k^T * scale, masked) v for q (B, T, H, D), k/v (B, S, G, D), mask (B, 1, T, S).

    Float64 inputs take an explicit float64 softmax (XLA's call always takes it in float32).
    """
    if q.dtype == jnp.float64:
        return float64_attention(q, k, v, mask, scale)
    if resolve(impl, q.shape[1]) == "blocked":
        return blocked_attention(q, k, v, mask, scale)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)


def float64_attention(q, k, v, mask, scale):
    """Grouped-query attention entirely in float64."""
    b, t, h, d = q.shape
    g = k.shape[2]
    qg = q.reshape(b, t, g, h // g, d)
    logits = jnp.einsum("btgrd,bsgd->bgrts", qg, k) * scale
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bgrts,bsgd->btgrd", probs, v).reshape(b, t, h, d)


def blocked_attention(q, k, v, mask, scale, block: int = BLOCK):
    """Attention one (sequence, kv head, query block) at a time; float32 softmax as XLA's call.

    Each block keeps only its output and softmax normaliser for the backward pass, which
    recomputes the block's probabilities (flash-attention style, _block_attention). Fully masked
    query rows (padding) give finite outputs.
    """
    b, t, h, d = q.shape
    s, g = k.shape[1], k.shape[2]
    r = h // g
    qb = min(block, t)
    nq = -(-t // qb)
    pad = nq * qb - t
    n = b * g * nq
    qs = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, nq, qb, g, r, d)
    qs = qs.transpose(0, 3, 1, 4, 2, 5).reshape(n, r, qb, d)
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
    """One block: q (R, Q, D), k/v (S, D), mask (Q, S) -> (R, Q, D)."""
    return _block_forward(q, k, v, mask, scale)[0]


def _block_forward(q, k, v, mask, scale):
    """(output, log-sum-exp of each row's masked scores), softmax in float32."""
    scores = jnp.einsum("rqd,sd->rqs", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[None], scores, jnp.finfo(jnp.float32).min)
    top = scores.max(-1, keepdims=True)
    p = jnp.exp(scores - top)
    total = p.sum(-1, keepdims=True)
    out = jnp.einsum("rqs,sd->rqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / total).astype(q.dtype), top + jnp.log(total)


def _block_fwd(q, k, v, mask, scale):
    out, lse = _block_forward(q, k, v, mask, scale)
    return out, (q, k, v, mask, out, lse)


def _block_bwd(scale, res, g):
    """Gradients from the recomputed probabilities: dS = P * (dO V^T - rowsum(dO * O))."""
    q, k, v, mask, out, lse = res
    f32 = jnp.float32
    scores = jnp.einsum("rqd,sd->rqs", q, k, preferred_element_type=f32) * scale
    p = jnp.where(mask[None], jnp.exp(scores - lse), 0.0)
    g32 = g.astype(f32)
    dv = jnp.einsum("rqs,rqd->sd", p, g32)
    dp = jnp.einsum("rqd,sd->rqs", g32, v.astype(f32))
    ds = p * (dp - jnp.sum(g32 * out.astype(f32), -1, keepdims=True)) * scale
    dq = jnp.einsum("rqs,sd->rqd", ds, k.astype(f32))
    dk = jnp.einsum("rqs,rqd->sd", ds, q.astype(f32))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_block_attention.defvjp(_block_fwd, _block_bwd)
