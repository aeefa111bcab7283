"""Hugging Face <-> grit_jax conversion for MistralForCausalLM and LlamaForCausalLM, tensor by tensor.

Import reads ``model.safetensors`` or a sharded ``model.safetensors.index.json`` one tensor at a
time into preallocated stacked arrays (one copy of the model in memory), checks every shape and
that every tensor arrived, then writes an Orbax params checkpoint. Export reads the checkpoint
and writes safetensors shards one shard at a time (peak: the model plus one shard).
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable, Iterator

import numpy as np

from grit_jax import checkpoint
from grit_jax.config import ModelConfig, RopeScaling
from grit_jax.data.tokenizers import load_tokenizer

SUPPORTED = {"mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM"}
SAFE_SINGLE = "model.safetensors"
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
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
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
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=hf.get("sliding_window") if mt == "mistral" else None,
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        bos_token_id=int(hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 1),
        eos_token_id=int(eos[0] if isinstance(eos, list) else (eos if eos is not None else 2)),
    )
    cfg.update(overrides)
    return ModelConfig(**cfg)


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
    if c.family == "mistral":
        hf["sliding_window"] = c.sliding_window
    else:
        hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    return hf


# ----------------------------------------------------------------------------------------------
# Tensor name mapping
# ----------------------------------------------------------------------------------------------
# (HF name pattern, grit path, HF -> grit, grit -> HF); {i} is the layer index.
def _layouts(c: ModelConfig):
    e, d, h, g = c.hidden_size, c.resolved_head_dim, c.num_heads, c.num_kv_heads

    def qkv(n):
        return (lambda w: w.T.reshape(e, n, d)), (lambda w: w.reshape(e, n * d).T)

    o = (lambda w: w.T.reshape(h, d, e)), (lambda w: w.reshape(h * d, e).T)
    t = (lambda w: w.T), (lambda w: w.T)
    same = (lambda w: w), (lambda w: w)
    rows = [
        ("model.embed_tokens.weight", ("embed", "embedding"), *same),
        ("model.norm.weight", ("final_norm", "scale"), *same),
        ("model.layers.{i}.input_layernorm.weight", ("layers", "attn_norm", "scale"), *same),
        ("model.layers.{i}.post_attention_layernorm.weight", ("layers", "mlp_norm", "scale"), *same),
        ("model.layers.{i}.self_attn.q_proj.weight", ("layers", "attn", "q"), *qkv(h)),
        ("model.layers.{i}.self_attn.k_proj.weight", ("layers", "attn", "k"), *qkv(g)),
        ("model.layers.{i}.self_attn.v_proj.weight", ("layers", "attn", "v"), *qkv(g)),
        ("model.layers.{i}.self_attn.o_proj.weight", ("layers", "attn", "o"), *o),
        ("model.layers.{i}.mlp.gate_proj.weight", ("layers", "mlp", "gate"), *t),
        ("model.layers.{i}.mlp.up_proj.weight", ("layers", "mlp", "up"), *t),
        ("model.layers.{i}.mlp.down_proj.weight", ("layers", "mlp", "down"), *t),
    ]
    if not c.tie_word_embeddings:
        rows.append(("lm_head.weight", ("lm_head", "kernel"), *t))
    return rows


def _hf_shape(c: ModelConfig, name: str, grit_shape) -> tuple:
    e, d, h, g = c.hidden_size, c.resolved_head_dim, c.num_heads, c.num_kv_heads
    if name.endswith(("q_proj.weight",)):
        return (h * d, e)
    if name.endswith(("k_proj.weight", "v_proj.weight")):
        return (g * d, e)
    if name.endswith("o_proj.weight"):
        return (e, h * d)
    if name.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight", "lm_head.weight")):
        return tuple(reversed(grit_shape))
    return tuple(grit_shape)


def hf_tensor_names(c: ModelConfig) -> Iterator[tuple[str, tuple, int | None, Callable, Callable]]:
    """Every HF tensor of the model: (name, grit path, layer index or None, to_grit, to_hf)."""
    for pattern, path, to_grit, to_hf in _layouts(c):
        if "{i}" in pattern:
            for i in range(c.num_layers):
                yield pattern.format(i=i), path, i, to_grit, to_hf
        else:
            yield pattern, path, None, to_grit, to_hf


def _grit_shapes(c: ModelConfig) -> dict[tuple, tuple]:
    from grit_jax.model import abstract_params
    import flax
    import flax.linen as nn

    flat = flax.traverse_util.flatten_dict(nn.unbox(abstract_params(c)))
    return {k: tuple(v.shape) for k, v in flat.items()}


# ----------------------------------------------------------------------------------------------
# Reading safetensors
# ----------------------------------------------------------------------------------------------
def _safetensors_files(hf_dir: str) -> dict[str, str]:
    """tensor name -> file, from the index or the single file."""
    index = os.path.join(hf_dir, SAFE_INDEX)
    single = os.path.join(hf_dir, SAFE_SINGLE)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        return {k: os.path.join(hf_dir, v) for k, v in weight_map.items()}
    if os.path.exists(single):
        from safetensors import safe_open

        with safe_open(single, framework="numpy") as f:
            return {k: single for k in f.keys()}
    raise FileNotFoundError(f"{hf_dir}: neither {SAFE_SINGLE} nor {SAFE_INDEX} found "
                            f"(only safetensors checkpoints are read)")


IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class StackedParams:
    """grit_jax's (layer-stacked) parameter arrays, preallocated and filled one HF tensor at a time."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.shapes = _grit_shapes(config)
        self.dtype = np.dtype(config.jnp_param_dtype)
        self.arrays = {k: np.empty(s, self.dtype) for k, s in self.shapes.items()}
        # HF name -> (grit path, layer index or None, HF -> grit transform)
        self.expected = {name: (path, i, to_grit)
                         for name, path, i, to_grit, _ in hf_tensor_names(config)}

    def hf_shape(self, name: str) -> tuple:
        """The shape the HF tensor ``name`` must have."""
        path, layer, _ = self.expected[name]
        return _hf_shape(self.config, name, self.shapes[path][1:] if layer is not None
                         else self.shapes[path])

    def put(self, name: str, w: np.ndarray, where: str) -> None:
        """Check w's shape (the error names ``where``) and place it."""
        want = self.hf_shape(name)
        if tuple(w.shape) != want:
            raise ValueError(f"{where}: tensor {name} has shape {tuple(w.shape)}, expected {want}")
        path, layer, to_grit = self.expected[name]
        w = to_grit(w).astype(self.dtype)
        if layer is None:
            self.arrays[path][...] = w
        else:
            self.arrays[path][layer] = w

    def params(self):
        """The nested params, handed to jax (zero-copy on CPU: Orbax then stages one copy, not two)."""
        import flax
        import jax

        for k in list(self.arrays):
            self.arrays[k] = jax.device_put(self.arrays[k])
        return flax.traverse_util.unflatten_dict(self.arrays)


def read_hf(hf_dir: str, *, param_dtype: str = "float32", **config_overrides):
    """(ModelConfig, params as a nested dict of jax arrays) from a Hugging Face directory."""
    from safetensors import safe_open

    cfg_path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing (is {hf_dir} a Hugging Face model directory?)")
    with open(cfg_path, encoding="utf-8") as f:
        hf_cfg = json.load(f)
    config = config_from_hf(hf_cfg, cfg_path, param_dtype=param_dtype, dtype=param_dtype)
    stacked = StackedParams(config)
    expected = stacked.expected
    files = _safetensors_files(hf_dir)
    unexpected = sorted(n for n in files if n not in expected and not IGNORED.search(n)
                        and not (n == "lm_head.weight" and config.tie_word_embeddings))
    if unexpected:
        raise ValueError(f"{hf_dir}: unexpected tensor(s) for {SUPPORTED[config.family]}: "
                         f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    missing = sorted(n for n in expected if n not in files)
    if missing:
        raise ValueError(f"{hf_dir}: missing tensor(s) {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''} (checkpoint incomplete?)")
    by_file: dict[str, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for path_, names in by_file.items():
        with safe_open(path_, framework="numpy") as f:
            available = set(f.keys())
            for name in names:
                if name not in available:
                    raise ValueError(f"{path_}: tensor {name} listed in the index is not in the file")
                stacked.put(name, f.get_tensor(name), path_)
    return config, stacked.params()


def hf_to_grit(hf_dir: str, out_dir: str, *, param_dtype: str = "float32") -> ModelConfig:
    """Convert a Hugging Face Mistral/Llama directory into a grit_jax params directory."""
    config, params = read_hf(hf_dir, param_dtype=param_dtype)
    checkpoint.save_params(out_dir, params, config)
    try:
        load_tokenizer(hf_dir).save(out_dir)
    except FileNotFoundError:
        pass  # a model without tokenizer files converts; inference then needs --tokenizer
    _copy_if_exists(hf_dir, out_dir, "generation_config.json")
    return config


def _copy_if_exists(src_dir, dst_dir, name):
    import shutil

    if os.path.exists(os.path.join(src_dir, name)):
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(dst_dir, name))


# ----------------------------------------------------------------------------------------------
# Writing safetensors
# ----------------------------------------------------------------------------------------------
def write_hf(params, config: ModelConfig, out_dir: str, *, dtype: str | None = None,
             max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write params as HF safetensors (sharded above max_shard_bytes) plus config files."""
    import flax
    import jax.numpy as jnp
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    flat = flax.traverse_util.flatten_dict(params)
    dtype = dtype or config.param_dtype
    itemsize = jnp.dtype(dtype).itemsize
    # Plan shards from shapes alone, then materialise one shard at a time.
    plan, cur, cur_bytes = [], [], 0
    for name, path, layer, _, to_hf in hf_tensor_names(config):
        if path not in flat:
            raise ValueError(f"params lack {'/'.join(path)} (needed for {name})")
        shape = flat[path].shape[1:] if layer is not None else flat[path].shape
        nbytes = int(np.prod(shape)) * itemsize
        if cur and cur_bytes + nbytes > max_shard_bytes:
            plan.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, path, layer, to_hf))
        cur_bytes += nbytes
    plan.append(cur)
    n = len(plan)
    weight_map, files, total = {}, [], 0
    for s, shard in enumerate(plan):
        fname = SAFE_SINGLE if n == 1 else f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name, path, layer, to_hf in shard:
            w = np.asarray(flat[path] if layer is None else flat[path][layer])
            tensors[name] = np.ascontiguousarray(to_hf(w).astype(jnp.dtype(dtype)))
            weight_map[name] = fname
            total += tensors[name].nbytes
        save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
        files.append(os.path.join(out_dir, fname))
        del tensors
    if n > 1:
        with open(os.path.join(out_dir, SAFE_INDEX), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config_to_hf(config, torch_dtype=str(jnp.dtype(dtype))), f, indent=2)
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           "do_sample": False}
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(gen, f, indent=2)
    return files


def grit_to_hf(params_dir: str, out_dir: str, *, dtype: str | None = None,
               max_shard_bytes: int = 5 * 2**30, step: int | None = None,
               tokenizer: str | None = None) -> ModelConfig:
    """Convert a grit_jax params directory or training workdir (latest or given step) into a
    Hugging Face directory with tokenizer files."""
    if checkpoint.is_workdir(params_dir):
        params, config, _ = checkpoint.load_params_from_workdir(params_dir, step)
    else:
        params, config = checkpoint.load_params(params_dir)
    write_hf(params, config, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes)
    try:
        load_tokenizer(tokenizer or params_dir).save(out_dir)
    except FileNotFoundError:
        pass
    return config
