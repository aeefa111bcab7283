"""QLoRA-style storage of the frozen base: every attention and MLP weight as int8 with one
float32 scale per output channel (absmax / 127 over the input axes), dequantized to the compute
dtype inside the layer that uses it. Only with LoRA: int8 weights take no updates.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from grit_jax.config import ModelConfig

# projection -> (parent module, number of input axes of its weight)
WEIGHTS = {"q": ("attn", 1), "k": ("attn", 1), "v": ("attn", 1), "o": ("attn", 2),
           "gate": ("mlp", 1), "up": ("mlp", 1), "down": ("mlp", 1)}
SCALE = "_scale"


def quantize_weight(w, n_in: int, stacked: bool = True):
    """(int8 weight, float32 scale over the output axes) of w; ``stacked``: a leading layers
    axis keeps its own scales."""
    w = jnp.asarray(w, jnp.float32)
    axes = tuple(range(1, 1 + n_in)) if stacked else tuple(range(n_in))
    scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return q, jnp.squeeze(scale, axis=axes)


def dequantize_weight(q, scale, n_in: int, dtype, stacked: bool = True):
    """q * scale in dtype (the scale broadcast over the input axes)."""
    lead = 1 if stacked else 0
    s = jnp.expand_dims(scale, tuple(range(lead, lead + n_in)))
    return (q.astype(jnp.float32) * s).astype(dtype)


def _paths(flat):
    for name, (group, n_in) in WEIGHTS.items():
        path = ("layers", group, name)
        if path in flat:
            yield path, n_in


def quantize(params, config: ModelConfig):
    """Float params (stacked layers) -> the int8 layout of ``config`` (base_quant='int8')."""
    flat = dict(flax.traverse_util.flatten_dict(params))
    for path, n_in in list(_paths(flat)):
        flat[path], flat[path[:-1] + (path[-1] + SCALE,)] = quantize_weight(flat[path], n_in)
    return flax.traverse_util.unflatten_dict(flat)


def dequantize(params, config: ModelConfig):
    """(params with int8 weights back in param_dtype, config without quantization): for export."""
    if config.base_quant == "none":
        return params, config
    flat = dict(flax.traverse_util.flatten_dict(params))
    for path, n_in in list(_paths(flat)):
        scale = flat.pop(path[:-1] + (path[-1] + SCALE,))
        flat[path] = dequantize_weight(flat[path], scale, n_in, config.jnp_param_dtype)
    return flax.traverse_util.unflatten_dict(flat), config.replace(base_quant="none")


def quantize_sharded(params, config: ModelConfig, shardings):
    """quantize as one jitted program whose outputs land in ``shardings`` (the int8 layout's)."""
    return jax.jit(lambda p: quantize(p, config), out_shardings=shardings)(params)
