"""LoRA: which parameters train, merging adapters into their weights, and the PEFT layout.

The adapters are parameters of the model itself (``layers/attn/q_lora_a`` ..., see
``grit_jax.model``): each adapted projection computes ``x W + (alpha / rank) dropout(x) A B``.
With adapters, only they (and an embedding head) train: the frozen base takes no gradient and no
optimizer state. ``merge`` folds ``(alpha / rank) A B`` into W for export; ``peft_tensors`` is
the adapters alone under the names ``peft.PeftModel`` loads.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

from grit_jax.config import ModelConfig

ADAPTER = "_lora_"
# grit projection -> (HF module path inside a layer, number of input axes of its grit weight)
HF_MODULES = {"q": ("self_attn.q_proj", 1), "k": ("self_attn.k_proj", 1),
              "v": ("self_attn.v_proj", 1), "o": ("self_attn.o_proj", 2),
              "gate": ("mlp.gate_proj", 1), "up": ("mlp.up_proj", 1), "down": ("mlp.down_proj", 1)}


def is_adapter(path) -> bool:
    return ADAPTER in str(path[-1])


def is_trainable(path, has_adapters: bool) -> bool:
    """With adapters: the adapters and the embedding head; otherwise every parameter."""
    return not has_adapters or is_adapter(path) or path[0] == "projection"


def has_adapters(params) -> bool:
    return any(is_adapter(p) for p in flax.traverse_util.flatten_dict(params))


def partition(params):
    """(trainable, frozen) nested dicts of params (frozen is empty without adapters); works on
    arrays, abstract shapes and logically boxed trees alike."""
    flat = flax.traverse_util.flatten_dict(params)
    lora = any(is_adapter(p) for p in flat)
    train = {p: v for p, v in flat.items() if is_trainable(p, lora)}
    frozen = {p: v for p, v in flat.items() if not is_trainable(p, lora)}
    unflat = flax.traverse_util.unflatten_dict
    return unflat(train), (unflat(frozen) if frozen else {})


def combine(trainable, frozen):
    """The inverse of partition: one params tree."""
    if not frozen:
        return trainable
    flat = flax.traverse_util.flatten_dict
    return flax.traverse_util.unflatten_dict({**flat(frozen), **flat(trainable)})


def init_adapter(path, shape, config: ModelConfig, key):
    """A fresh adapter as the model initialises one: A uniform in +-1/sqrt(fan in) (PEFT's
    kaiming-uniform), B zero."""
    name = str(path[-1])
    if name.endswith("_lora_b"):
        return jnp.zeros(shape, config.jnp_param_dtype)
    fan_in = int(np.prod(shape[1:-1]))  # after the layers axis, before the rank
    bound = 1.0 / np.sqrt(fan_in)
    return jax.random.uniform(key, shape, config.jnp_param_dtype, -bound, bound)


def delta(a, b, n_in: int, scale: float):
    """(alpha / rank) A B as a weight of the adapted projection's shape (A: in axes + rank, B:
    rank + out axes; a stacked layers axis leads both)."""
    layered = a.ndim - n_in - 1 == 1
    if layered:
        return jax.vmap(lambda x, y: delta(x, y, n_in, scale))(a, b)
    return scale * jnp.tensordot(a, b, axes=1)


def merge(params, config: ModelConfig):
    """(params with every adapter folded into its weight and removed, the config without LoRA):
    the same model, as plain weights (what a Hugging Face export holds)."""
    if not config.lora_rank:
        return params, config
    flat = dict(flax.traverse_util.flatten_dict(params))
    scale = config.lora_alpha / config.lora_rank
    for name in sorted(config.lora_target_set):
        for path in [p for p in flat if p[-1] == f"{name}_lora_a"]:
            base = path[:-1] + (name,)
            a, b = flat.pop(path), flat.pop(path[:-1] + (f"{name}_lora_b",))
            w = jnp.asarray(flat[base])
            dt = jnp.promote_types(w.dtype, jnp.float32)  # float32, or float64 for float64
            d = delta(jnp.asarray(a, dt), jnp.asarray(b, dt), HF_MODULES[name][1], scale)
            flat[base] = (w.astype(dt) + d).astype(w.dtype)
    return flax.traverse_util.unflatten_dict(flat), config.replace(lora_rank=0)


def peft_config(config: ModelConfig, base_model: str = "") -> dict:
    """adapter_config.json of the adapters (PEFT's LoraConfig fields)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.lora_rank,
            "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
            "target_modules": sorted(HF_MODULES[t][0].split(".")[-1]
                                     for t in config.lora_target_set),
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "init_lora_weights": True, "inference_mode": True,
            "base_model_name_or_path": base_model}


def peft_tensors(params, config: ModelConfig) -> dict[str, np.ndarray]:
    """The adapters as PEFT names them: ``base_model.model.model.layers.{i}.<module>.lora_A.weight``
    (rank, in features) and ``lora_B.weight`` (out features, rank)."""
    if not config.lora_rank:
        raise ValueError("this model has no LoRA adapters (lora_rank=0)")
    flat = flax.traverse_util.flatten_dict(params)
    out = {}
    for name in sorted(config.lora_target_set):
        module, n_in = HF_MODULES[name]
        group = "mlp" if name in ("gate", "up", "down") else "attn"
        a = np.asarray(flat[("layers", group, f"{name}_lora_a")], np.float32)
        b = np.asarray(flat[("layers", group, f"{name}_lora_b")], np.float32)
        for i in range(config.num_layers):
            prefix = f"base_model.model.model.layers.{i}.{module}"
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(
                a[i].reshape(-1, config.lora_rank).T)
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(
                b[i].reshape(config.lora_rank, -1).T)
    return out
