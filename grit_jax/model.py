"""The Mistral/Llama/Mixtral decoder in Flax: RMSNorm, RoPE, grouped-query attention, SwiGLU
(or routed SwiGLU experts), scanned layers.

The attention mask mode (``"causal"``, ``"bidirectional"`` or ``"prefix"``) is an argument of
every call, not a property of the model: GRIT runs the same weights bidirectionally to embed and
causally to generate (PrefixLM: bidirectionally within each prompt span, causally elsewhere).
Parameters carry logical axis names (see ``grit_jax.sharding``).

Parameter layout (leading ``layers`` axis on everything under ``layers``)::

    embed/embedding        (vocab, embed)
    layers/attn_norm/scale (layers, embed)
    layers/attn/q          (layers, embed, heads, head_dim)     k, v: kv_heads instead of heads
    layers/attn/o          (layers, heads, head_dim, embed)
    layers/mlp_norm/scale  (layers, embed)
    layers/mlp/gate, up    (layers, embed, mlp)                  down: (layers, mlp, embed)
    layers/moe/router      (layers, embed, experts)              mixtral, instead of layers/mlp
    layers/moe/gate, up    (layers, expert, embed, mlp)          down: (layers, expert, mlp, embed)
    final_norm/scale       (embed,)
    lm_head/kernel         (embed, vocab)                        absent when embeddings are tied
    projection/kernel      (embed, projection)                   only with projection_dim > 0;
    projection/bias        (projection,)                         the embedding head
    layers/attn/q_lora_a   (layers, embed, lora_rank)            LoRA adapters (lora_rank > 0) of
    layers/attn/q_lora_b   (layers, lora_rank, heads, head_dim)  each target: <w>_lora_a holds the
                                                                 weight's input axes, _b its output
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from grit_jax import attention, moe, quant, sharding
from grit_jax.config import ModelConfig

MODES = ("causal", "bidirectional", "prefix")


# ----------------------------------------------------------------------------------------------
# Pure functions: RoPE and masks
# ----------------------------------------------------------------------------------------------
def rope_inv_freq(config: ModelConfig) -> jnp.ndarray:
    """RoPE inverse frequencies (float32; float64 for float64 models), Llama-3 scaling if set."""
    d = config.resolved_head_dim
    inv = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=config.accum_dtype) / d))
    rs = config.rope_scaling
    if rs is None:
        return inv
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rope_tables(positions: jnp.ndarray, config: ModelConfig):
    """cos/sin tables of shape positions.shape + (head_dim,), Hugging Face rotate-half layout."""
    freqs = positions.astype(config.accum_dtype)[..., None] * rope_inv_freq(config)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jnp.ndarray) -> jnp.ndarray:
    """(-x2, x1) for x = (x1, x2) split in halves on the last axis (Hugging Face's layout)."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x (B, T, H, D) by cos/sin (B, T, D): x*cos + rotate_half(x)*sin."""
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotate_half(x) * sin


def shift_rope(k, delta, config: ModelConfig):
    """Keys (..., T, kv_heads, head_dim) rotated by RoPE through ``delta`` more positions.

    RoPE rotates each (i, i + head_dim/2) pair by ``position * inv_freq[i]``; rotations compose,
    so a key cached at position p becomes the key at p + delta without recomputing it. Computed
    in float32, returned in k's dtype.
    """
    angle = jnp.asarray(delta, config.accum_dtype) * rope_inv_freq(config)
    emb = jnp.concatenate([angle, angle], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x = jnp.asarray(k, config.accum_dtype)
    return (x * cos + rotate_half(x) * sin).astype(k.dtype)


def prompt_spans(prompt: jnp.ndarray) -> jnp.ndarray:
    """(B, T) int32: the index of each contiguous run of prompt tokens (True in ``prompt``) within
    its row, -1 on other tokens: the blocks PrefixLM attends to bidirectionally."""
    prompt = prompt.astype(bool)
    starts = prompt & ~jnp.pad(prompt[:, :-1], ((0, 0), (1, 0)))
    return jnp.where(prompt, jnp.cumsum(starts, axis=1, dtype=jnp.int32) - 1, -1)


def attention_mask(q_pos: jnp.ndarray, k_pos: jnp.ndarray, k_valid: jnp.ndarray, mode: str,
                   sliding_window: int | None = None, spans: jnp.ndarray | None = None
                   ) -> jnp.ndarray:
    """Boolean (B, 1, Tq, Tk) mask: which key each query may attend to.

    ``bidirectional``: every valid (non-padding) key. ``causal``: valid keys at positions <= the
    query's, and, with a sliding window W, only the last W of them (``q - k < W``, as Hugging
    Face Mistral). The window is deliberately ignored in bidirectional mode: embeddings attend
    to the whole input, as the original GritLM does (recent transformers apply the window there
    too, which silently truncates long documents). ``prefix`` (self-attention only): causal, and
    besides every key of the query's own prompt span (``spans``, see prompt_spans), so a prompt
    is read bidirectionally while no position sees a later reply token.
    """
    if mode not in MODES:
        raise ValueError(f"attention mode must be one of {MODES}, got {mode!r}")
    allowed = jnp.broadcast_to(k_valid[:, None, :],
                               (k_valid.shape[0], q_pos.shape[1], k_valid.shape[1]))
    if mode != "bidirectional":
        diff = q_pos[:, :, None] - k_pos[:, None, :]
        seen = diff >= 0
        if sliding_window is not None:
            seen = seen & (diff < sliding_window)
        if mode == "prefix":
            if (spans is None or spans.shape[1] != q_pos.shape[1]
                    or spans.shape[1] != k_pos.shape[1]):
                raise ValueError("mode='prefix' needs the prompt spans of a self-attention call "
                                 "(queries and keys the same tokens)")
            seen = seen | ((spans[:, :, None] == spans[:, None, :]) & (spans[:, :, None] >= 0))
        allowed = allowed & seen
    return allowed[:, None, :, :]


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------
class KVCache(NamedTuple):
    """Static-size key/value cache: k, v (layers, B, S, kv_heads, head_dim); lengths (B,) int32.

    Slot s of row b holds the token at position s; slots >= lengths[b] are free (masked). A call
    with a cache writes its T new tokens at slots lengths[b] .. lengths[b]+T-1 and advances
    lengths by the number of valid (non-padding) new tokens. The caller must keep
    lengths + T <= S (``dynamic_update_slice`` would otherwise clamp the write).
    """

    k: jnp.ndarray
    v: jnp.ndarray
    lengths: jnp.ndarray

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, size: int, dtype=None) -> "KVCache":
        """A zeroed cache for `batch` rows and `size` slots."""
        shape = (config.num_layers, batch, size, config.num_kv_heads, config.resolved_head_dim)
        dtype = dtype or config.jnp_dtype
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

    @property
    def size(self) -> int:
        return self.k[0].shape[1] if self.per_layer else self.k.shape[2]

    @property
    def per_layer(self) -> bool:
        """k and v are tuples of per-layer (B, S, kv_heads, head_dim) arrays (the decode layout:
        each layer's buffer is updated in place, none is sliced out of a stack)."""
        return isinstance(self.k, (tuple, list))

    def split(self) -> "KVCache":
        """This cache with per-layer k and v (no-op when already split)."""
        if self.per_layer:
            return self
        n = self.k.shape[0]
        return KVCache(tuple(self.k[i] for i in range(n)), tuple(self.v[i] for i in range(n)),
                       self.lengths)

    def stacked(self) -> "KVCache":
        """This cache with (layers, B, S, kv_heads, head_dim) k and v."""
        if not self.per_layer:
            return self
        return KVCache(jnp.stack(self.k), jnp.stack(self.v), self.lengths)


class Output(NamedTuple):
    """Final-norm hidden states (B, T, E), the updated cache (None when none was given) and,
    for mixture-of-experts models, per-layer routing statistics of the valid tokens."""

    hidden: jnp.ndarray
    cache: KVCache | None
    router: moe.RouterStats | None = None


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------
def _param(module: nn.Module, name: str, shape, axes, config: ModelConfig, init=None):
    init = init or nn.initializers.normal(config.initializer_range)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape,
                        config.jnp_param_dtype)


def _weight(module: nn.Module, name: str, shape, axes, n_in: int):
    """A projection's weight in the compute dtype: a parameter, or with base_quant its integer
    codes and float32 ``<name>_scale`` dequantized (grit_jax.quant)."""
    c = module.config
    if c.base_quant == "none":
        return _param(module, name, shape, axes, c).astype(c.jnp_dtype)

    lo, hi, top = quant.code_range(c)
    bound = math.sqrt(3.0) * c.initializer_range  # a random init uniform with that std

    def q_init(key, shape_, dtype):  # random codes: real bases are quantized as they are read
        return jax.random.randint(key, shape_, lo, hi + 1).astype(dtype)

    q = module.param(name, nn.with_logical_partitioning(q_init, axes), shape,
                     quant.STORAGE[c.base_quant])
    scale = module.param(name + quant.SCALE, nn.with_logical_partitioning(
        nn.initializers.constant(bound / top), quant.scale_axes(axes, n_in, c, stacked=False)),
        quant.scale_shape(shape, n_in, c, stacked=False), jnp.float32)
    return quant.dequantize_weight(q, scale, c, c.jnp_dtype)


def _lora(module: nn.Module, name: str, x, in_shape, in_axes, out_shape, out_axes):
    """The LoRA term of projection ``name`` for input x (its last len(in_shape) dims contract):
    (alpha / rank) * dropout(x) A B, or None when the projection has no adapter. A starts as
    PEFT's (uniform, fan-in scaled), B at zero, so a new adapter leaves the model unchanged."""
    c = module.config
    if name not in c.lora_target_set:
        return None
    n, r, dt = len(in_shape), c.lora_rank, c.jnp_dtype
    a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform",
                                              in_axis=tuple(range(n)), out_axis=n)
    a = _param(module, f"{name}_lora_a", tuple(in_shape) + (r,), tuple(in_axes) + ("lora_rank",),
               c, a_init)
    b = _param(module, f"{name}_lora_b", (r,) + tuple(out_shape), ("lora_rank",) + tuple(out_axes),
               c, nn.initializers.zeros)
    if c.lora_dropout and module.has_rng("dropout"):
        x = nn.Dropout(c.lora_dropout, deterministic=False, name=f"{name}_lora_dropout")(x)
    low = jnp.tensordot(x, a.astype(dt), axes=n)
    return (c.lora_alpha / r) * jnp.tensordot(low, b.astype(dt), axes=1)


def _plus(y, delta):
    return y if delta is None else y + delta.astype(y.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32 (float64 for float64 models), scaled in the
    compute dtype."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", (self.config.hidden_size,), ("norm",), self.config,
                       nn.initializers.ones)
        x32 = x.astype(self.config.accum_dtype)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True)
                                     + self.config.rms_norm_eps)
        return normed.astype(x.dtype) * scale.astype(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional per-layer KV cache."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv=None, offsets=None):
        c = self.config
        e, h, g, d = c.hidden_size, c.num_heads, c.num_kv_heads, c.resolved_head_dim
        dt = c.jnp_dtype
        wq = _weight(self, "q", (e, h, d), ("embed", "heads", "head_dim"), 1)
        wk = _weight(self, "k", (e, g, d), ("embed", "kv_heads", "head_dim"), 1)
        wv = _weight(self, "v", (e, g, d), ("embed", "kv_heads", "head_dim"), 1)
        wo = _weight(self, "o", (h, d, e), ("heads", "head_dim", "embed"), 2)
        q = jnp.einsum("bte,ehd->bthd", x, wq.astype(dt))
        k = jnp.einsum("bte,ehd->bthd", x, wk.astype(dt))
        v = jnp.einsum("bte,ehd->bthd", x, wv.astype(dt))
        if c.lora_rank:
            q = _plus(q, _lora(self, "q", x, (e,), ("embed",), (h, d), ("heads", "head_dim")))
            k = _plus(k, _lora(self, "k", x, (e,), ("embed",), (g, d), ("kv_heads", "head_dim")))
            v = _plus(v, _lora(self, "v", x, (e,), ("embed",), (g, d), ("kv_heads", "head_dim")))
        q = checkpoint_name(q, "query_proj")
        k = checkpoint_name(k, "key_proj")
        v = checkpoint_name(v, "value_proj")
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_kv = None
        if kv is not None:
            ck, cv = kv
            write = jax.vmap(lambda buf, new, o: jax.lax.dynamic_update_slice(
                buf, new, (o, jnp.zeros_like(o), jnp.zeros_like(o))))  # one index dtype (x64)
            ck, cv = write(ck, k.astype(ck.dtype), offsets), write(cv, v.astype(cv.dtype), offsets)
            new_kv = (ck, cv)
            k, v = ck.astype(dt), cv.astype(dt)
        out = checkpoint_name(attention.attention(q, k, v, mask, d ** -0.5, c.attention_impl),
                              "context")
        if x.shape[1] == 1:  # a decode step: contract the merged heads so wo is read in place
            b = x.shape[0]
            proj = out.reshape(b, 1, h * d) @ wo.astype(dt).reshape(h * d, e)
        else:
            proj = jnp.einsum("bthd,hde->bte", out, wo.astype(dt))
        if c.lora_rank:
            proj = _plus(proj, _lora(self, "o", out, (h, d), ("heads", "head_dim"), (e,),
                                     ("embed",)))
        return checkpoint_name(proj, "out_proj"), new_kv


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c, dt = self.config, self.config.jnp_dtype
        gate = _weight(self, "gate", (c.hidden_size, c.intermediate_size), ("embed", "mlp"), 1)
        up = _weight(self, "up", (c.hidden_size, c.intermediate_size), ("embed", "mlp"), 1)
        down = _weight(self, "down", (c.intermediate_size, c.hidden_size), ("mlp", "embed"), 1)
        e, m = (c.hidden_size,), (c.intermediate_size,)
        g = _plus(x @ gate.astype(dt), _lora(self, "gate", x, e, ("embed",), m, ("mlp",)))
        u = _plus(x @ up.astype(dt), _lora(self, "up", x, e, ("embed",), m, ("mlp",)))
        g, u = checkpoint_name(g, "mlp_gate"), checkpoint_name(u, "mlp_up")
        hidden = nn.silu(g) * u
        out = _plus(hidden @ down.astype(dt),
                    _lora(self, "down", hidden, m, ("mlp",), e, ("embed",)))
        return checkpoint_name(out, "mlp_down")


class MoE(nn.Module):
    """Mixtral sparse MoE block: float32 top-k router, then routed SwiGLU experts (grit_jax.moe)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, valid):
        c, dt = self.config, self.config.jnp_dtype
        n_exp, e, m = c.num_experts, c.hidden_size, c.intermediate_size
        router = _param(self, "router", (e, n_exp), ("embed", None), c)
        gate = _param(self, "gate", (n_exp, e, m), ("expert", "embed", "mlp"), c)
        up = _param(self, "up", (n_exp, e, m), ("expert", "embed", "mlp"), c)
        down = _param(self, "down", (n_exp, m, e), ("expert", "mlp", "embed"), c)
        b, t, _ = x.shape
        flat = x.reshape(b * t, e)
        probs, top_w, top_i = moe.route(flat, router, c.num_experts_per_tok)
        y = moe.experts(flat, top_w, top_i, gate.astype(dt), up.astype(dt), down.astype(dt),
                        c.moe_impl)
        return y.reshape(b, t, e), moe.router_stats(probs, top_i, valid)


class Block(nn.Module):
    """One pre-norm decoder layer; a scan body (carry = hidden states, xs = this layer's cache;
    outputs: the new cache and, for MoE layers, routing statistics)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, kv, cos, sin, mask, offsets, valid):
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        attn, new_kv = Attention(self.config, name="attn")(
            RMSNorm(self.config, name="attn_norm")(x), cos, sin, mask, kv, offsets)
        x = x + attn
        h = RMSNorm(self.config, name="mlp_norm")(x)
        stats = None
        if self.config.is_moe:
            h, stats = MoE(self.config, name="moe")(h, valid)
        else:
            h = MLP(self.config, name="mlp")(h)
        return x + h, (new_kv, stats)


# Remat policies (what the backward pass keeps from the forward; the rest is recomputed), named
# after the activations the layers tag with checkpoint_name: the attention projections
# (query_proj, key_proj, value_proj, out_proj), the attention output ("context", with the splash
# kernel's residuals), the MLP's gate/up/down products.
PROJECTIONS = ("query_proj", "key_proj", "value_proj", "out_proj")
MLP_DOTS = ("mlp_gate", "mlp_up", "mlp_down")
_SAVE = jax.checkpoint_policies.save_only_these_names
_OFFLOAD = partial(jax.checkpoint_policies.save_and_offload_only_these_names,
                   names_which_can_be_saved=[], offload_src="device", offload_dst="pinned_host")
REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,  # only each layer's input
    "save_qkv_proj": _SAVE(*PROJECTIONS[:3]),
    "save_dot_except_mlp": _SAVE(*PROJECTIONS),  # every attention matmul output
    "save_dot_except_mlpwi": _SAVE(*PROJECTIONS, "mlp_down"),  # ... and the MLP's output
    "minimal": _SAVE(*PROJECTIONS, *MLP_DOTS),  # every matmul output
    "minimal_with_context": _SAVE(*PROJECTIONS, *MLP_DOTS, "context"),
    "qkv_proj_offloaded": _OFFLOAD(names_which_can_be_offloaded=list(PROJECTIONS[:3])),
    "minimal_offloaded": _OFFLOAD(names_which_can_be_offloaded=list(PROJECTIONS + MLP_DOTS)),
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Transformer(nn.Module):
    """Decoder: embed -> scanned blocks -> final norm; ``logits`` applies the LM head.

    ``per_layer``: the layers as separate modules ``layer_0`` .. ``layer_{L-1}`` over per-layer
    parameters (see ``split_layers``) instead of one scan over a stacked ``layers`` tree. Same
    math; inference uses it because XLA:CPU copies each layer's weights out of the stack at every
    call (every decoded token), which per-layer weights never need.
    """

    config: ModelConfig
    per_layer: bool = False

    def setup(self):
        c = self.config
        self.embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.jnp_dtype,
                              param_dtype=c.jnp_param_dtype,
                              embedding_init=nn.with_logical_partitioning(
                                  nn.initializers.normal(c.initializer_range),
                                  ("embed_vocab", "embed")))
        block = Block
        if c.remat_policy != "none":
            block = nn.remat(Block, policy=REMAT[c.remat_policy], prevent_cse=False)
        if self.per_layer:
            self.layer = [block(c) for _ in range(c.num_layers)]  # named layer_0, layer_1, ...
        else:
            self.layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=c.num_layers, unroll=c.scan_unroll or c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})(c)
        self.final_norm = RMSNorm(c)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=c.jnp_dtype,
                                    param_dtype=c.jnp_param_dtype,
                                    kernel_init=nn.with_logical_partitioning(
                                        nn.initializers.normal(c.initializer_range),
                                        ("embed", "vocab")))
        if c.projection_dim:
            self.projection = nn.Dense(
                c.projection_dim, dtype=c.accum_dtype, param_dtype=c.jnp_param_dtype,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.normal(c.initializer_range), ("embed", "projection")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("projection",)))

    def __call__(self, tokens, valid=None, *, mode: str = "causal", positions=None,
                 cache: KVCache | None = None, prompt=None) -> Output:
        """Hidden states of tokens (B, T) under the given attention mode.

        valid: (B, T) bool, False on (right) padding. positions: (B, T) RoPE positions; default
        ``arange(T)``, continuing after ``cache.lengths`` when a cache is given. prompt: (B, T)
        bool, the tokens ``mode="prefix"`` reads bidirectionally (within each contiguous run).
        """
        c = self.config
        b, t = tokens.shape
        if (mode == "prefix") != (prompt is not None) or (mode == "prefix" and cache is not None):
            raise ValueError("mode='prefix' takes a prompt mask (B, T) and no cache; other modes "
                             "take no prompt mask")
        valid = jnp.ones((b, t), bool) if valid is None else valid.astype(bool)
        if cache is None:
            offsets = jnp.zeros((b,), jnp.int32)
            k_valid, k_pos = valid, None
        else:
            offsets = cache.lengths.astype(jnp.int32)
            slots = jnp.arange(cache.size, dtype=jnp.int32)[None, :]
            new_lengths = offsets + valid.sum(-1).astype(jnp.int32)
            k_valid, k_pos = slots < new_lengths[:, None], jnp.broadcast_to(slots, (b, cache.size))
        self_attention = cache is None and positions is None
        default_positions = positions is None
        if positions is None:
            positions = offsets[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        if k_pos is None:
            k_pos = positions
        if attention.resolve(c.attention_impl, t, self_attention=self_attention) in \
                attention.SPLASH_IMPLS and c.dtype != "float64" and mode != "prefix":
            if mode not in MODES:
                raise ValueError(f"attention mode must be one of {MODES}, got {mode!r}")
            # The kernel builds its masks from these parts (grit_jax.attention.SelfMask).
            mask = attention.SelfMask(valid, mode, c.sliding_window if mode == "causal" else None)
        else:
            if mode == "bidirectional":  # the valid keys alone: kernels may add a per-key bias
                mask = attention.KeyMask(k_valid)
            else:
                spans = None if prompt is None else prompt_spans(prompt & valid)
                mask = attention_mask(positions, k_pos, k_valid, mode, c.sliding_window, spans)
            if mode == "causal" and default_positions:  # slot = position: kernels may skip keys
                reach = 1 if cache is None else cache.size - t + 1
                mask = attention.CausalMask(mask, reach, c.sliding_window)
        cos, sin = rope_tables(positions, c)

        x = embed_lookup(self.embed.embedding.astype(c.jnp_dtype), tokens)
        kv = None if cache is None else (cache.k, cache.v)
        if self.per_layer:
            x, new_kv, stats = self._layer_by_layer(x, cache, cos, sin, mask, offsets, valid)
        else:
            x, (new_kv, stats) = self.layers(x, kv, cos, sin, mask, offsets, valid)
        hidden = self.final_norm(x)
        new_cache = None if cache is None else KVCache(new_kv[0], new_kv[1], new_lengths)
        return Output(hidden, new_cache, stats)

    def _layer_by_layer(self, x, cache, cos, sin, mask, offsets, valid):
        """The per-layer modules in order; the cache keeps its layout (stacked or per-layer) and
        routing statistics are stacked as the scan stacks them."""
        ks, vs, stats = [], [], []
        layers = None if cache is None else cache.split()
        for i, block in enumerate(self.layer):
            kv = None if layers is None else (layers.k[i], layers.v[i])
            x, (new_kv, st) = block(x, kv, cos, sin, mask, offsets, valid)
            stats.append(st)
            if new_kv is not None:
                ks.append(new_kv[0])
                vs.append(new_kv[1])
        new_kv = None
        if cache is not None:
            new_kv = (tuple(ks), tuple(vs)) if cache.per_layer else (jnp.stack(ks), jnp.stack(vs))
        stats = None if stats[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *stats)
        return x, new_kv, stats

    def logits(self, hidden):
        """LM-head logits in float32 (float64 models: float64); tied embeddings reuse the
        embedding."""
        if self.config.tie_word_embeddings:
            return self.embed.attend(hidden).astype(self.config.accum_dtype)
        return self.lm_head(hidden).astype(self.config.accum_dtype)

    def project(self, reps):
        """The embedding head: pooled embeddings (B, embed) -> (B, projection_dim), float32
        (float64 models: float64)."""
        return self.projection(reps.astype(self.config.accum_dtype))

    def init_all(self, tokens):
        """Touch every parameter (body, LM head, embedding head); used only for initialisation."""
        hidden = self(tokens).hidden
        if self.config.projection_dim:
            self.project(hidden[:, 0])
        return self.logits(hidden)


def embed_lookup(table, tokens):
    """Rows of the embedding table for tokens (B, T) -> (B, T, E).

    On a mesh each device gathers the table (stored sharded over its embedding axis, like every
    FSDP weight) and looks up its own rows of the batch, inside shard_map: the output is batch-
    sharded, and the gradient is reduce-scattered back onto the table's shards. Left to the
    partitioner, the lookup in a sharded table gathered every data replica's tokens (across the
    slices of a multislice pod) and a replicated table's gradient was all-reduced whole.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return jnp.take(table, tokens, axis=0)
    table_spec = sharding.logical_to_spec(("embed_vocab", "embed"))
    axes = tuple(a for a in sharding.batch_axes() if a in mesh.axis_names)
    rows = axes if tokens.shape[0] % math.prod(mesh.shape[a] for a in axes) == 0 else None

    def local(tbl, ids):
        for dim, names in enumerate(table_spec):
            for name in ((names,) if isinstance(names, str) else names or ()):
                tbl = jax.lax.all_gather(tbl, name, axis=dim, tiled=True)
        return jnp.take(tbl, ids, axis=0)

    # check_vma off: the gathered table is the same on every device of its axes, which the
    # varying-axes check cannot infer through all_gather here.
    return jax.shard_map(local, in_specs=(table_spec, P(rows, None)),
                         out_specs=P(rows, None, None), check_vma=False)(table, tokens)


def init_params(config: ModelConfig, seed: int = 0):
    """Randomly initialised (unboxed) parameters."""
    model = Transformer(config)
    tokens = jnp.zeros((1, 4), jnp.int32)
    variables = jax.jit(partial(model.init, method=Transformer.init_all))(
        jax.random.PRNGKey(seed), tokens)
    return nn.unbox(variables["params"])


def abstract_params(config: ModelConfig):
    """ShapeDtypeStructs of the parameters, boxed with their logical axis names."""
    model = Transformer(config)
    tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    return jax.eval_shape(partial(model.init, method=Transformer.init_all),
                          jax.random.PRNGKey(0), tokens)["params"]


def param_shapes(config: ModelConfig, shardings=None):
    """ShapeDtypeStructs of the (unboxed) parameters, placed with ``shardings`` if given."""
    shapes = nn.unbox(abstract_params(config))
    if shardings is None:
        return shapes
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, shardings)


def is_per_layer(params) -> bool:
    """Whether params hold per-layer trees ``layer_0`` .. (``split_layers``), not a stack."""
    return "layer_0" in params


def split_layers(params, num_layers: int | None = None, *, consume: bool = False):
    """Params with the scanned ``layers`` stack split once into per-layer trees ``layer_{i}``.

    For inference (``Transformer.per_layer``): each layer's weights become arrays of their own,
    keeping their sharding (the stacked axis dropped from it). A tree of NamedShardings of the
    stacked params (``num_layers`` given) splits into the per-layer params' shardings. A no-op
    on per-layer params. Holds both layouts while it runs (the stack is freed when the caller
    drops it), unless ``consume``: each stacked array is deleted as soon as its layers are split
    off, so the split adds one array, not the model, to the peak memory (the caller must not
    use the stacked params again).
    """
    if is_per_layer(params) or "layers" not in params:
        return params
    stack = params["layers"]
    n = num_layers or jax.tree.leaves(stack)[0].shape[0]

    def split(a):
        if isinstance(a, jax.sharding.NamedSharding):
            return (_drop_layer_axis(a),) * n
        sh = getattr(a, "sharding", None)
        if isinstance(sh, jax.sharding.NamedSharding):
            out = jax.jit(lambda x: tuple(x[i] for i in range(n)),
                          out_shardings=(_drop_layer_axis(sh),) * n)(a)
        else:
            out = tuple(jnp.asarray(a)[i] for i in range(n))
        if consume and isinstance(a, jax.Array):
            jax.block_until_ready(out)
            a.delete()
        return out

    pieces = jax.tree.map(split, stack)
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n):
        out[f"layer_{i}"] = jax.tree.map(lambda t: t[i], pieces,
                                         is_leaf=lambda t: isinstance(t, tuple))
    return out


def _drop_layer_axis(sh):
    return jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec(*tuple(sh.spec)[1:]))


def forward(params, config: ModelConfig, tokens, valid=None, *, mode="causal", positions=None,
            cache=None, prompt=None, dropout_rng=None) -> Output:
    """Functional entry point: hidden states (and cache) for tokens; stacked or per-layer params.
    ``dropout_rng``: a key for LoRA dropout (training); None: no dropout."""
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    return Transformer(config, per_layer=is_per_layer(params)).apply(
        {"params": params}, tokens, valid, mode=mode, positions=positions, cache=cache,
        prompt=prompt, rngs=rngs)


def project(params, config: ModelConfig, reps):
    """Functional embedding head (``config.projection_dim > 0``): reps (B, embed) -> (B, dim)."""
    return Transformer(config, per_layer=is_per_layer(params)).apply(
        {"params": params}, reps, method=Transformer.project)


def init_projection(config: ModelConfig, seed: int = 0):
    """A fresh embedding head (as Transformer initialises it), to add one to pretrained weights."""
    kernel = jax.random.normal(jax.random.PRNGKey(seed),
                               (config.hidden_size, config.projection_dim))
    return {"kernel": (kernel * config.initializer_range).astype(config.jnp_param_dtype),
            "bias": jnp.zeros((config.projection_dim,), config.jnp_param_dtype)}


def logits_fn(params, config: ModelConfig, hidden):
    """Functional LM head."""
    return Transformer(config, per_layer=is_per_layer(params)).apply(
        {"params": params}, hidden, method=Transformer.logits)
