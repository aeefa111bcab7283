"""Hugging Face <-> grit_jax conversion for MistralForCausalLM, LlamaForCausalLM and
MixtralForCausalLM, tensor by tensor.

Import reads ``model.safetensors`` or a sharded ``model.safetensors.index.json`` one tensor at a
time into preallocated stacked arrays (one copy of the model in memory), checks every shape and
that every tensor arrived, then writes an Orbax params checkpoint. Export reads the checkpoint
and writes safetensors shards one shard at a time (peak: the model plus one shard).

Mixtral experts use the per-expert layout that transformers' ``save_pretrained`` writes (and
4.x and 5.x both load): ``model.layers.N.block_sparse_moe.gate.weight`` (the router) and
``model.layers.N.block_sparse_moe.experts.M.w1/w3/w2.weight`` (gate/up/down), one HF tensor per
(layer, expert) slot of grit_jax's ``layers/moe/*`` arrays. The fused in-memory layout of
transformers 5.x (``mlp.experts.gate_up_proj``) is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from typing import Callable, Iterator

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from grit_jax import checkpoint, lora, outputs, quant
from grit_jax.config import ModelConfig, RopeScaling
from grit_jax.data.tokenizers import load_tokenizer
from grit_jax.model import abstract_params

SUPPORTED = {"mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM",
             "mixtral": "MixtralForCausalLM"}
SLIDING_WINDOW_FAMILIES = ("mistral", "mixtral")
# Defaults of config.json fields where transformers' MixtralConfig differs from the others'.
FAMILY_DEFAULTS = {"mixtral": {"rope_theta": 1e6, "rms_norm_eps": 1e-5}}
SAFE_SINGLE = "model.safetensors"
# The embedding head (projection_dim > 0) beside the transformers checkpoint, which has no place
# for it: torch.nn.Linear's state dict (weight (dim, hidden), bias (dim,)) and its shape.
PROJECTION_FILE = "projection.safetensors"
PROJECTION_CONFIG = "projection_config.json"
SAFE_INDEX = "model.safetensors.index.json"
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads")


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ----------------------------------------------------------------------------------------------
def config_from_hf(hf: dict, source: str = "config.json", **overrides) -> ModelConfig:
    """ModelConfig from a transformers config dict (4.x ``rope_theta``/``rope_scaling`` or 5.x
    ``rope_parameters``); unsupported architectures or features are errors naming the field."""
    mt = hf.get("model_type")
    if mt not in SUPPORTED:
        raise ValueError(f"{source}: model_type={mt!r} is not supported "
                         f"(supported: {sorted(SUPPORTED)})")
    missing = [f for f in REQUIRED_FIELDS if f not in hf]
    if missing:
        raise ValueError(f"{source}: missing required field(s) {missing}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (silu only)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"{source}: {flag}=true is not supported")
    rope = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    defaults = {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, **FAMILY_DEFAULTS.get(mt, {})}
    theta = rope.get("rope_theta", hf.get("rope_theta", defaults["rope_theta"]))
    kind = rope.get("rope_type", legacy.get("rope_type", legacy.get("type", "default")))
    scaling_src = rope if rope.get("rope_type") not in (None, "default") else legacy
    scaling = None
    if kind == "llama3":
        try:
            scaling = RopeScaling(
                factor=float(scaling_src["factor"]),
                low_freq_factor=float(scaling_src["low_freq_factor"]),
                high_freq_factor=float(scaling_src["high_freq_factor"]),
                original_max_position_embeddings=int(scaling_src["original_max_position_embeddings"]))
        except KeyError as e:
            raise ValueError(f"{source}: llama3 rope scaling lacks field {e}") from None
    elif kind not in ("default", None):
        raise ValueError(f"{source}: rope_type={kind!r} is not supported (default, llama3)")
    heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) * heads == int(hf["hidden_size"]):
        head_dim = None  # the default: keep configs that mean the same thing equal
    eos = hf.get("eos_token_id", 2)
    cfg = dict(
        family=mt,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=None if head_dim is None else int(head_dim),
        rope_theta=float(theta),
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", defaults["rms_norm_eps"])),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=hf.get("sliding_window") if mt in SLIDING_WINDOW_FAMILIES else None,
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        bos_token_id=int(hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 1),
        eos_token_id=int(eos[0] if isinstance(eos, list) else (eos if eos is not None else 2)),
    )
    if mt == "mixtral":
        cfg.update(_moe_from_hf(hf, source))
    cfg.update(overrides)
    try:
        return ModelConfig(**cfg)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def _moe_from_hf(hf: dict, source: str) -> dict:
    """ModelConfig's MoE fields from a MixtralConfig dict; unsupported values name the field."""
    if hf.get("num_local_experts") is None:
        raise ValueError(f"{source}: missing required field 'num_local_experts' (experts per "
                         f"layer of a mixtral model)")
    experts = int(hf["num_local_experts"])
    if experts < 1:
        raise ValueError(f"{source}: num_local_experts={experts} (must be >= 1)")
    per_tok = int(hf.get("num_experts_per_tok", 2))
    if not 1 <= per_tok <= experts:
        raise ValueError(f"{source}: num_experts_per_tok={per_tok} must be in "
                         f"[1, num_local_experts={experts}]")
    jitter = float(hf.get("router_jitter_noise") or 0.0)
    if jitter > 0:
        raise ValueError(f"{source}: router_jitter_noise={jitter} is not supported (router "
                         f"jitter is not implemented; set it to 0.0)")
    return dict(num_experts=experts, num_experts_per_tok=per_tok,
                router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))


def config_to_hf(c: ModelConfig, torch_dtype: str = "float32") -> dict:
    """A config.json dict that transformers 4.x and 5.x both read."""
    hf = {
        "architectures": [SUPPORTED[c.family]],
        "model_type": c.family,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "initializer_range": c.initializer_range,
        "rms_norm_eps": c.rms_norm_eps,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "rope_theta": c.rope_theta,
        "use_cache": True,
        "attention_dropout": 0.0,
        "torch_dtype": torch_dtype,
    }
    params = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        rs = {"rope_type": "llama3", "factor": c.rope_scaling.factor,
              "low_freq_factor": c.rope_scaling.low_freq_factor,
              "high_freq_factor": c.rope_scaling.high_freq_factor,
              "original_max_position_embeddings": c.rope_scaling.original_max_position_embeddings}
        hf["rope_scaling"] = rs
        params.update(rs)
    hf["rope_parameters"] = params
    if c.family in SLIDING_WINDOW_FAMILIES:
        hf["sliding_window"] = c.sliding_window
    else:
        hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    if c.is_moe:
        hf.update(num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                  router_aux_loss_coef=c.router_aux_loss_coef, router_jitter_noise=0.0,
                  output_router_logits=False)
    return hf


# ----------------------------------------------------------------------------------------------
# Tensor name mapping
# ----------------------------------------------------------------------------------------------
# How an HF tensor maps to its slot of a grit array: "same", "t" (transposed), "qkv" (HF rows
# (heads, head_dim) x embed -> grit (embed, heads, head_dim)), "o" (HF embed x (heads, head_dim)
# -> grit (heads, head_dim, embed)).
def _transforms(kind: str, c: ModelConfig, heads: int = 0):
    """(HF -> grit, grit -> HF) of a layout kind."""
    e, d = c.hidden_size, c.resolved_head_dim
    if kind == "qkv":
        return (lambda w: w.T.reshape(e, heads, d)), (lambda w: w.reshape(e, heads * d).T)
    if kind == "o":
        return (lambda w: w.T.reshape(heads, d, e)), (lambda w: w.reshape(heads * d, e).T)
    if kind == "t":
        return (lambda w: w.T), (lambda w: w.T)
    return (lambda w: w), (lambda w: w)


def read_block(tensor, kind: str, index: tuple, head_dim: int) -> np.ndarray:
    """``grit_slot[index]`` read from an HF tensor (anything sliceable with ``[rows, cols]``, e.g.
    a safetensors slice, so only those elements are read); index holds one slice per grit dim."""
    if kind == "same":
        return np.asarray(tensor[index])
    if kind == "t":
        return np.asarray(tensor[index[1], index[0]]).T
    if kind == "qkv":  # grit (embed, heads, head_dim) <- HF ((heads, head_dim), embed)
        e_sl, h_sl, d_sl = index
        rows = slice(h_sl.start * head_dim, h_sl.stop * head_dim)
        w = np.asarray(tensor[rows, e_sl]).T
        return w.reshape(w.shape[0], -1, head_dim)[:, :, d_sl]
    if kind == "o":  # grit (heads, head_dim, embed) <- HF (embed, (heads, head_dim))
        h_sl, d_sl, e_sl = index
        rows = slice(h_sl.start * head_dim, h_sl.stop * head_dim)
        w = np.asarray(tensor[e_sl, rows]).T
        return w.reshape(-1, head_dim, w.shape[-1])[:, d_sl, :]
    raise ValueError(f"unknown layout kind {kind!r}")


# (HF name pattern, grit path, layout kind, heads); {i} is the layer index, {j} the expert.
def _layout_rows(c: ModelConfig):
    h, g = c.num_heads, c.num_kv_heads
    rows = [
        ("model.embed_tokens.weight", ("embed", "embedding"), "same", 0),
        ("model.norm.weight", ("final_norm", "scale"), "same", 0),
        ("model.layers.{i}.input_layernorm.weight", ("layers", "attn_norm", "scale"), "same", 0),
        ("model.layers.{i}.post_attention_layernorm.weight", ("layers", "mlp_norm", "scale"),
         "same", 0),
        ("model.layers.{i}.self_attn.q_proj.weight", ("layers", "attn", "q"), "qkv", h),
        ("model.layers.{i}.self_attn.k_proj.weight", ("layers", "attn", "k"), "qkv", g),
        ("model.layers.{i}.self_attn.v_proj.weight", ("layers", "attn", "v"), "qkv", g),
        ("model.layers.{i}.self_attn.o_proj.weight", ("layers", "attn", "o"), "o", h),
    ]
    if c.is_moe:
        moe = "model.layers.{i}.block_sparse_moe."
        rows += [
            (moe + "gate.weight", ("layers", "moe", "router"), "t", 0),
            (moe + "experts.{j}.w1.weight", ("layers", "moe", "gate"), "t", 0),
            (moe + "experts.{j}.w3.weight", ("layers", "moe", "up"), "t", 0),
            (moe + "experts.{j}.w2.weight", ("layers", "moe", "down"), "t", 0),
        ]
    else:
        rows += [
            ("model.layers.{i}.mlp.gate_proj.weight", ("layers", "mlp", "gate"), "t", 0),
            ("model.layers.{i}.mlp.up_proj.weight", ("layers", "mlp", "up"), "t", 0),
            ("model.layers.{i}.mlp.down_proj.weight", ("layers", "mlp", "down"), "t", 0),
        ]
    if not c.tie_word_embeddings:
        rows.append(("lm_head.weight", ("lm_head", "kernel"), "t", 0))
    if c.projection_dim:
        rows += [("projection.weight", ("projection", "kernel"), "t", 0),
                 ("projection.bias", ("projection", "bias"), "same", 0)]
    return rows


def _layouts(c: ModelConfig):
    """(HF name pattern, grit path, HF -> grit, grit -> HF) of every tensor kind."""
    return [(pattern, path, *_transforms(kind, c, heads))
            for pattern, path, kind, heads in _layout_rows(c)]


TRANSPOSED = ("gate_proj.weight", "up_proj.weight", "down_proj.weight", "lm_head.weight",
              "projection.weight",
              "block_sparse_moe.gate.weight", ".w1.weight", ".w2.weight", ".w3.weight")


def _hf_shape(c: ModelConfig, name: str, grit_shape) -> tuple:
    e, d, h, g = c.hidden_size, c.resolved_head_dim, c.num_heads, c.num_kv_heads
    if name.endswith(("q_proj.weight",)):
        return (h * d, e)
    if name.endswith(("k_proj.weight", "v_proj.weight")):
        return (g * d, e)
    if name.endswith("o_proj.weight"):
        return (e, h * d)
    if name.endswith(TRANSPOSED):
        return tuple(reversed(grit_shape))
    return tuple(grit_shape)


Index = int | tuple[int, int] | None


def hf_tensor_slots(c: ModelConfig) -> Iterator[tuple[str, tuple, Index, str]]:
    """Every HF tensor of the model: (name, grit path, index, layout kind); the tensor is
    ``array[index]`` of the grit array at path: index is None (the whole array), the layer, or
    (layer, expert) for Mixtral's per-expert tensors."""
    for pattern, path, kind, _ in _layout_rows(c):
        if "{j}" in pattern:
            for i in range(c.num_layers):
                for j in range(c.num_experts):
                    yield pattern.format(i=i, j=j), path, (i, j), kind
        elif "{i}" in pattern:
            for i in range(c.num_layers):
                yield pattern.format(i=i), path, i, kind
        else:
            yield pattern, path, None, kind


def hf_tensor_names(c: ModelConfig) -> Iterator[tuple[str, tuple, Index, Callable, Callable]]:
    """hf_tensor_slots with each kind's (HF -> grit, grit -> HF) transforms."""
    heads = {path: h for _, path, _, h in _layout_rows(c)}
    for name, path, index, kind in hf_tensor_slots(c):
        yield (name, path, index, *_transforms(kind, c, heads[path]))


def slot_shape(shape: tuple, index: Index) -> tuple:
    """Shape of ``array[index]`` for an array of the given shape (see hf_tensor_names)."""
    if index is None:
        return tuple(shape)
    return tuple(shape[len(index) if isinstance(index, tuple) else 1:])


def _grit_shapes(c: ModelConfig) -> dict[tuple, tuple]:
    flat = flax.traverse_util.flatten_dict(nn.unbox(abstract_params(c)))
    return {k: tuple(v.shape) for k, v in flat.items()}


# ----------------------------------------------------------------------------------------------
# Reading safetensors
# ----------------------------------------------------------------------------------------------
def _safetensors_files(hf_dir: str) -> dict[str, str]:
    """tensor name -> file, from the index or the single file."""
    index = os.path.join(hf_dir, SAFE_INDEX)
    single = os.path.join(hf_dir, SAFE_SINGLE)
    head = os.path.join(hf_dir, PROJECTION_FILE)
    extra = {}
    if os.path.exists(head):
        with open_safetensors(head) as f:
            extra = {f"projection.{k}": head for k in f.keys()}
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        return {**{k: os.path.join(hf_dir, v) for k, v in weight_map.items()}, **extra}
    if os.path.exists(single):
        with open_safetensors(single) as f:
            return {**{k: single for k in f.keys()}, **extra}
    raise FileNotFoundError(f"{hf_dir}: neither {SAFE_SINGLE} nor {SAFE_INDEX} found "
                            f"(only safetensors checkpoints are read)")


def key_in_file(name: str, path: str) -> str:
    """The key of tensor ``name`` inside the file at path: projection.safetensors holds a
    torch.nn.Linear state dict (``weight``, ``bias``), the model files the full names."""
    return name.split(".", 1)[1] if os.path.basename(path) == PROJECTION_FILE else name


IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# transformers 5.x's in-memory MoE layout: all experts of a layer in one tensor.
FUSED_EXPERTS = re.compile(r"experts\.(gate_up_proj|down_proj)|(^|\.)mlp\.experts\.(?!\d+\.)")


def refuse_fused_experts(files: dict[str, str]) -> None:
    """Error naming the first fused-expert tensor (and its file), if any: experts are read in
    the per-expert layout that save_pretrained writes."""
    for name in sorted(files):
        if FUSED_EXPERTS.search(name):
            raise ValueError(
                f"{files[name]}: tensor {name} holds fused experts (transformers' in-memory "
                f"layout); expected the per-expert layout model.layers.N.block_sparse_moe."
                f"experts.M.w1/w2/w3.weight that save_pretrained writes (re-save the model with "
                f"transformers' save_pretrained)")


class StackedParams:
    """grit_jax's (layer-stacked) parameter arrays, preallocated and filled one HF tensor at a
    time."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.shapes = _grit_shapes(config)
        self.dtype = np.dtype(config.jnp_param_dtype)
        self.arrays = {k: np.empty(s, self.dtype) for k, s in self.shapes.items()}
        # HF name -> (grit path, index (see hf_tensor_names), HF -> grit transform)
        self.expected = {name: (path, index, to_grit)
                         for name, path, index, to_grit, _ in hf_tensor_names(config)}

    def hf_shape(self, name: str) -> tuple:
        """The shape the HF tensor ``name`` must have."""
        path, index, _ = self.expected[name]
        return _hf_shape(self.config, name, slot_shape(self.shapes[path], index))

    def put(self, name: str, w: np.ndarray, where: str) -> None:
        """Check w's shape (the error names ``where``) and place it."""
        want = self.hf_shape(name)
        if tuple(w.shape) != want:
            raise ValueError(f"{where}: tensor {name} has shape {tuple(w.shape)}, expected {want}")
        path, index, to_grit = self.expected[name]
        self.arrays[path][... if index is None else index] = to_grit(w).astype(self.dtype)

    def params(self):
        """The nested params, handed to jax (zero-copy on CPU: Orbax then stages one copy, not
        two)."""
        for k in list(self.arrays):
            self.arrays[k] = jax.device_put(self.arrays[k])
        return flax.traverse_util.unflatten_dict(self.arrays)


def read_hf_config(hf_dir: str, **overrides) -> ModelConfig:
    """The ModelConfig of a Hugging Face directory (its config.json), without any weights."""
    cfg_path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing "
                                f"(is {hf_dir} a Hugging Face model directory?)")
    with open(cfg_path, encoding="utf-8") as f:
        try:
            hf_cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    config = config_from_hf(hf_cfg, cfg_path, **overrides)
    head = os.path.join(hf_dir, PROJECTION_CONFIG)
    if os.path.exists(head) and "projection_dim" not in overrides:
        try:
            with open(head, encoding="utf-8") as f:
                shape = json.load(f)
            dim, width = int(shape["out_features"]), int(shape["in_features"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{head}: expected JSON with in_features and out_features ({e})") \
                from None
        if width != config.hidden_size:
            raise ValueError(f"{head}: in_features={width}, but the model's hidden_size is "
                             f"{config.hidden_size}")
        config = config.replace(projection_dim=dim)
    return config


def checked_files(hf_dir: str, config: ModelConfig) -> dict[str, str]:
    """Every HF tensor the config needs -> the safetensors file holding it; unexpected or missing
    tensors are errors naming them."""
    expected = {name for name, *_ in hf_tensor_slots(config)}
    files = _safetensors_files(hf_dir)
    if config.is_moe:
        refuse_fused_experts(files)
    unexpected = sorted(n for n in files if n not in expected and not IGNORED.search(n)
                        and not (n == "lm_head.weight" and config.tie_word_embeddings))
    if unexpected:
        raise ValueError(f"{hf_dir}: unexpected tensor(s) for {SUPPORTED[config.family]}: "
                         f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    missing = sorted(n for n in expected if n not in files)
    if missing:
        raise ValueError(f"{hf_dir}: missing tensor(s) {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''} (checkpoint incomplete?)")
    return {n: files[n] for n in expected}


def read_hf(hf_dir: str, *, param_dtype: str = "float32", **config_overrides):
    """(params as a nested dict of jax arrays, ModelConfig) from a Hugging Face directory, whole
    in this process's memory (conversion; training and inference read shards: grit_jax.weights)."""
    config = read_hf_config(hf_dir, param_dtype=param_dtype, dtype=param_dtype,
                            **config_overrides)
    stacked = StackedParams(config)
    files = checked_files(hf_dir, config)
    by_file: dict[str, list[str]] = {}
    for name in stacked.expected:
        by_file.setdefault(files[name], []).append(name)
    for path_, names in by_file.items():
        with open_safetensors(path_) as f:
            available = set(f.keys())
            for name in names:
                key = key_in_file(name, path_)
                if key not in available:
                    raise ValueError(f"{path_}: tensor {name} listed in the index "
                                     "is not in the file")
                try:
                    tensor = f.get_tensor(key)
                except Exception as e:  # noqa: BLE001 - safetensors' own error type
                    raise ValueError(f"{path_}: tensor {name} cannot be read ({e}); the file is "
                                     f"damaged: copy or download it again") from e
                stacked.put(name, tensor, path_)
    return stacked.params(), config


@contextlib.contextmanager
def open_safetensors(path: str):
    """safetensors' ``safe_open`` whose errors name the file (a truncated download, say)."""
    try:
        handle = safe_open(path, framework="numpy")
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise ValueError(f"{path}: not a readable safetensors file ({e}); the file is damaged or "
                         f"incomplete: copy or download it again") from e
    with handle as f:
        yield f


def hf_to_grit(hf_dir: str, out_dir: str, *, param_dtype: str = "float32",
               overwrite: bool = False) -> ModelConfig:
    """Convert a Hugging Face Mistral/Llama/Mixtral directory into a grit_jax params directory
    (written whole or not at all; an existing one is replaced only with ``overwrite``)."""
    outputs.check_target(out_dir, overwrite=overwrite)
    params, config = read_hf(hf_dir, param_dtype=param_dtype)
    with outputs.staged_dir(out_dir, overwrite=overwrite) as staging:
        checkpoint.save_params(params, config, staging)
        try:
            load_tokenizer(hf_dir).save(staging)
        except FileNotFoundError:
            pass  # a model without tokenizer files converts; inference then needs --tokenizer
        _copy_if_exists(hf_dir, staging, "generation_config.json")
    return config


def _copy_if_exists(src_dir, dst_dir, name):
    if os.path.exists(os.path.join(src_dir, name)):
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(dst_dir, name))


# ----------------------------------------------------------------------------------------------
# Writing safetensors
# ----------------------------------------------------------------------------------------------
def write_hf(params, config: ModelConfig, out_dir: str, *, dtype: str | None = None,
             max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write params as HF safetensors (sharded above max_shard_bytes) plus config files; an
    embedding head goes to projection.safetensors + projection_config.json beside them."""
    os.makedirs(out_dir, exist_ok=True)
    flat = flax.traverse_util.flatten_dict(params)
    dtype = dtype or config.param_dtype
    itemsize = jnp.dtype(dtype).itemsize
    # Plan shards from shapes alone, then materialise one shard at a time.
    plan, cur, cur_bytes = [], [], 0
    for name, path, index, _, to_hf in hf_tensor_names(config):
        if path not in flat:
            raise ValueError(f"params lack {'/'.join(path)} (needed for {name})")
        if name.startswith("projection."):  # written beside the model (write_projection)
            continue
        nbytes = int(np.prod(slot_shape(flat[path].shape, index))) * itemsize
        if cur and cur_bytes + nbytes > max_shard_bytes:
            plan.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, path, index, to_hf))
        cur_bytes += nbytes
    plan.append(cur)
    n = len(plan)
    weight_map, files, total = {}, [], 0
    for s, shard in enumerate(plan):
        fname = SAFE_SINGLE if n == 1 else f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name, path, index, to_hf in shard:
            w = np.asarray(flat[path] if index is None else flat[path][index])
            tensors[name] = np.ascontiguousarray(to_hf(w).astype(jnp.dtype(dtype)))
            weight_map[name] = fname
            total += tensors[name].nbytes
        save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
        files.append(os.path.join(out_dir, fname))
        del tensors
    if n > 1:
        with open(os.path.join(out_dir, SAFE_INDEX), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    files += write_projection(params, config, out_dir, dtype)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config_to_hf(config, torch_dtype=str(jnp.dtype(dtype))), f, indent=2)
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           "do_sample": False}
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(gen, f, indent=2)
    return files


def write_peft(params, config: ModelConfig, out_dir: str, *, dtype: str | None = None,
               base_model: str = "") -> list[str]:
    """The LoRA adapters alone as ``peft.PeftModel.from_pretrained`` reads them; an embedding
    head goes beside them as in write_hf."""
    os.makedirs(out_dir, exist_ok=True)
    dt = jnp.dtype(dtype or config.param_dtype)
    tensors = {k: v.astype(dt) for k, v in lora.peft_tensors(params, config).items()}
    path = os.path.join(out_dir, "adapter_model.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    with open(os.path.join(out_dir, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(lora.peft_config(config, base_model), f, indent=2)
    return [path] + write_projection(params, config, out_dir, dt)


def write_projection(params, config: ModelConfig, out_dir: str, dtype) -> list[str]:
    """The embedding head (if any) as torch.nn.Linear's state dict in projection.safetensors,
    with its shape in projection_config.json; the files written."""
    if not config.projection_dim:
        return []
    dt = jnp.dtype(dtype or config.param_dtype)
    w, b = (np.asarray(params["projection"][k]) for k in ("kernel", "bias"))
    path = os.path.join(out_dir, PROJECTION_FILE)
    save_file({"weight": np.ascontiguousarray(w.T.astype(dt)), "bias": b.astype(dt)}, path,
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, PROJECTION_CONFIG), "w", encoding="utf-8") as f:
        json.dump({"in_features": config.hidden_size, "out_features": config.projection_dim,
                   "bias": True}, f, indent=2)
    return [path]


def grit_to_hf(params_dir: str, out_dir: str, *, dtype: str | None = None,
               max_shard_bytes: int = 5 * 2**30, step: int | None = None,
               tokenizer: str | None = None, overwrite: bool = False,
               adapters_only: bool = False, base_model: str = "") -> ModelConfig:
    """Convert a grit_jax params directory or training workdir (latest or given step) into a
    Hugging Face directory with tokenizer files (written whole or not at all; a folder holding
    files is replaced, all of it, only with ``overwrite``). A LoRA model is written with its
    adapters merged into the weights, or with ``adapters_only`` as PEFT adapters alone."""
    outputs.check_target(out_dir, overwrite=overwrite)
    params, config = checkpoint.read_params(params_dir, step)
    if adapters_only and not config.lora_rank:
        raise ValueError(f"--lora-adapters: {params_dir} holds no LoRA adapters (lora_rank=0)")
    with outputs.staged_dir(out_dir, overwrite=overwrite) as staging:
        if adapters_only:
            write_peft(params, config, staging, dtype=dtype, base_model=base_model)
        else:
            params, config = lora.merge(*quant.dequantize(params, config))
            write_hf(params, config, staging, dtype=dtype, max_shard_bytes=max_shard_bytes)
        try:
            load_tokenizer(tokenizer or params_dir).save(staging)
        except FileNotFoundError:
            if tokenizer:
                raise
    return config
