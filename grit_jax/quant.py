"""QLoRA-style storage of the frozen base (``model.base_quant``), through qwix (Google's JAX
quantization library): every attention and MLP weight held as integer codes with float32 scales
and dequantized to the compute dtype inside the layer that uses it. Only with LoRA: quantized
weights take no updates.

- ``int8``: one scale per output channel (absmax over the input axes).
- ``int4`` / ``nf4`` (QLoRA's 4-bit NormalFloat): one scale per block of ``quant_block``
  consecutive inputs along the weight's last input axis and per output channel (QLoRA: 64).
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from grit_jax.config import ModelConfig

# projection -> (parent module, number of input axes of its weight)
WEIGHTS = {"q": ("attn", 1), "k": ("attn", 1), "v": ("attn", 1), "o": ("attn", 2),
           "gate": ("mlp", 1), "up": ("mlp", 1), "down": ("mlp", 1)}
SCALE = "_scale"
QTYPES = {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4"}
# The codes' dtype. nf4's codes (0..15, qwix's uint4) are kept as int4 minus 8: checkpoints
# (tensorstore) store int4 but not uint4.
STORAGE = {"int8": jnp.int8, "int4": jnp.int4, "nf4": jnp.int4}
NF4_OFFSET = 8


def tile(size: int, config: ModelConfig) -> int:
    """Inputs per scale along the last input axis: the block, or the whole axis if shorter."""
    return min(config.quant_block, size)


def _axes(ndim: int, n_in: int, config: ModelConfig, stacked: bool):
    """qwix's (channelwise axes, tiled axes) of a weight of ndim dims with n_in input axes."""
    lead = 1 if stacked else 0
    inputs = list(range(lead, lead + n_in))
    others = [a for a in range(ndim) if a not in inputs]
    if config.base_quant == "int8":
        return others, None
    return others + inputs[:-1], inputs[-1]


def scale_shape(shape, n_in: int, config: ModelConfig, stacked: bool = True):
    """Shape of a weight's scales: 1 on reduced input axes, size / tile on the tiled one."""
    channel, tiled = _axes(len(shape), n_in, config, stacked)
    return tuple(d if a in channel else (d // tile(d, config) if a == tiled else 1)
                 for a, d in enumerate(shape))


def scale_axes(axes, n_in: int, config: ModelConfig, stacked: bool = True):
    """Logical axes of the scales: the weight's, None where a scale axis has length 1."""
    channel, tiled = _axes(len(axes), n_in, config, stacked)
    return tuple(name if (a in channel or a == tiled) else None for a, name in enumerate(axes))


def code_range(config: ModelConfig) -> tuple[int, int, float]:
    """(lowest code, highest code, the value a scale of 1 gives the largest code)."""
    if config.base_quant == "nf4":
        return -NF4_OFFSET, 15 - NF4_OFFSET, 1.0
    info = jnp.iinfo(STORAGE[config.base_quant])
    return int(info.min), int(info.max), float(info.max)


def quantize_weight(w, n_in: int, config: ModelConfig, stacked: bool = True):
    """(codes, float32 scales) of w in ``config.base_quant``; ``stacked``: a leading layers axis
    keeps its own scales."""
    w = jnp.asarray(w, jnp.float32)
    channel, tiled = _axes(w.ndim, n_in, config, stacked)
    tiles = None if tiled is None else {tiled: tile(w.shape[tiled], config)}
    q = qwix.quantize(w, QTYPES[config.base_quant], channelwise_axes=channel, tiled_axes=tiles,
                      scale_dtype=jnp.float32)
    if config.base_quant == "nf4":
        return (q.qvalue.astype(jnp.int8) - NF4_OFFSET).astype(jnp.int4), q.scale
    return q.qvalue, q.scale


def dequantize_weight(codes, scale, config: ModelConfig, dtype):
    """The weight the codes and scales stand for, in dtype."""
    if config.base_quant == "nf4":
        codes = (codes.astype(jnp.int8) + NF4_OFFSET).astype(jnp.uint4)
    q = qwix.QArray(qvalue=codes, scale=scale, zero_point=None,
                    qtype=QTYPES[config.base_quant])
    return qwix.dequantize(q).astype(dtype)


def _paths(flat):
    for name, (group, n_in) in WEIGHTS.items():
        path = ("layers", group, name)
        if path in flat:
            yield path, n_in


def quantize(params, config: ModelConfig):
    """Float params (stacked layers) -> the quantized layout of ``config``."""
    flat = dict(flax.traverse_util.flatten_dict(params))
    for path, n_in in list(_paths(flat)):
        flat[path], flat[path[:-1] + (path[-1] + SCALE,)] = quantize_weight(flat[path], n_in,
                                                                            config)
    return flax.traverse_util.unflatten_dict(flat)


def dequantize(params, config: ModelConfig):
    """(params with the quantized weights back in param_dtype, config without quantization):
    for export."""
    if config.base_quant == "none":
        return params, config
    flat = dict(flax.traverse_util.flatten_dict(params))
    for path, _ in list(_paths(flat)):
        scale = flat.pop(path[:-1] + (path[-1] + SCALE,))
        flat[path] = dequantize_weight(flat[path], scale, config, config.jnp_param_dtype)
    return flax.traverse_util.unflatten_dict(flat), config.replace(base_quant="none")


def quantize_sharded(params, config: ModelConfig, shardings):
    """quantize as one jitted program whose outputs land in ``shardings`` (the quantized
    layout's)."""
    return jax.jit(lambda p: quantize(p, config), out_shardings=shardings)(params)


def levels(config: ModelConfig) -> np.ndarray:
    """The values a code stands for at scale 1 (sorted): what rounding chooses between."""
    lo, hi, _ = code_range(config)
    codes = jnp.arange(lo, hi + 1).astype(STORAGE[config.base_quant])
    return np.sort(np.asarray(dequantize_weight(codes, jnp.ones((1,), jnp.float32), config,
                                                jnp.float32)))
