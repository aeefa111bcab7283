"""Model weights from any source, read straight into their target shardings.

Sources: a training workdir (its newest checkpoint, parameters only), a grit_jax params
directory (Orbax + ``grit_config.json``), or a Hugging Face directory (``config.json`` + one or
several safetensors files). Every process reads only the shards its own devices hold: Orbax
restores each array with its target sharding (TensorStore reads the chunks behind them), and
safetensors tensors are sliced before they are read (``jax.make_array_from_callback``). Nothing
is ever assembled whole on one device or one host, so the same code loads a 7B model onto a
laptop CPU and onto every host of a pod.
"""

from __future__ import annotations

import contextlib
import itertools
import os

import jax
import numpy as np
from flax import traverse_util

from grit_jax import checkpoint, lora, quant, storage
from grit_jax.config import CONFIG_FILE, ModelConfig
from grit_jax.convert import gguf
from grit_jax.convert.hf import (_hf_shape, checked_files, hf_tensor_slots, key_in_file,
                                 open_safetensors, read_block, read_hf_config, slot_shape)
from grit_jax.model import init_projection, param_shapes

SOURCES = ("workdir", "params", "hf", "gguf")


def source_kind(path: str) -> str:
    """Which kind of weights path is (see SOURCES); a clear error otherwise."""
    if path.endswith(".gguf"):
        if storage.is_remote(path):
            raise ValueError(f"{path}: GGUF files are read from local disk; copy it to the host")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: GGUF file does not exist")
        return "gguf"
    if checkpoint.is_workdir(path):
        return "workdir"
    if storage.exists(storage.join(path, CONFIG_FILE)):
        return "params"
    if storage.exists(storage.join(path, "config.json")):
        if storage.is_remote(path):
            raise ValueError(f"{path}: Hugging Face directories are read from local disk "
                             f"(safetensors are memory-mapped); copy it to the host or mount it")
        return "hf"
    raise FileNotFoundError(f"{path}: neither a training workdir (checkpoints/), a grit_jax params "
                            f"directory ({CONFIG_FILE}), a Hugging Face model directory "
                            f"(config.json) nor a .gguf file")


def read_config(path: str) -> ModelConfig:
    """The ModelConfig stored with the weights at path (nothing else is read)."""
    kind = source_kind(path)
    if kind == "hf":
        return read_hf_config(path)
    if kind == "gguf":
        return gguf.read_gguf_config(path)
    return ModelConfig.load(path)


def tokenizer_path(path: str) -> str:
    """Where the tokenizer of the weights at path lies (the GGUF's own, extracted once)."""
    return gguf.tokenizer_dir(path) if source_kind(path) == "gguf" else path


def load_params(path: str, config: ModelConfig, shardings, *, step: int | None = None,
                new_params_seed: int | None = None):
    """Parameters of ``config``'s shapes and param_dtype from path, placed with ``shardings``
    (a tree like the parameters). ``step``: a workdir checkpoint other than the newest.
    ``new_params_seed``: an embedding head or LoRA adapters that config has and the stored
    weights lack start from a fresh init with this seed (finetuning a pretrained model)."""
    if config.base_quant != "none" and read_config(path).base_quant == "none":
        plain = config.replace(base_quant="none")
        flat_sh = traverse_util.flatten_dict(shardings)
        plain_sh = traverse_util.unflatten_dict(
            {p: s for p, s in flat_sh.items() if not p[-1].endswith(quant.SCALE)})
        params = load_params(path, plain, plain_sh, step=step, new_params_seed=new_params_seed)
        return quant.quantize_sharded(params, config, shardings)
    if new_params_seed is not None:
        stored = read_config(path)
        body = config
        if config.projection_dim and not stored.projection_dim:
            body = body.replace(projection_dim=0)
        if config.lora_rank and not stored.lora_rank:
            body = body.replace(lora_rank=0)
        if body != config:
            return _with_new_parts(path, config, body, shardings, step, new_params_seed)
    kind = source_kind(path)
    target = param_shapes(config, shardings)
    if kind == "workdir":
        return checkpoint.restore_workdir_params(path, target, step)
    if kind == "params":
        return checkpoint.restore_params(path, target)
    if kind == "gguf":
        return read_gguf_placed(path, config, target)
    return read_hf_sharded(path, config, target)


def read_gguf_placed(path: str, config: ModelConfig, target):
    """Parameters from a GGUF file placed with target's shardings. GGUF tensors are quantized in
    blocks along rows, so the file is dequantized whole on every host (meant for small models;
    convert large ones once with ``python -m grit_jax.convert gguf-to-grit``)."""
    params, _, _ = gguf.read_gguf(path, param_dtype=config.param_dtype)
    checkpoint.check_matches(params, target, path, "the run's config")
    flat, want = traverse_util.flatten_dict(params), traverse_util.flatten_dict(target)
    return traverse_util.unflatten_dict({k: jax.device_put(np.asarray(flat.pop(k), w.dtype),
                                                           w.sharding)
                                         for k, w in want.items()})


def _with_new_parts(path, config, body, shardings, step, seed):
    """load_params of body (what is stored) plus fresh parameters for what config adds."""
    flat_sh = traverse_util.flatten_dict(shardings)
    known = set(traverse_util.flatten_dict(param_shapes(body)))
    params = traverse_util.flatten_dict(load_params(
        path, body, traverse_util.unflatten_dict({p: s for p, s in flat_sh.items() if p in known}),
        step=step))
    shapes = traverse_util.flatten_dict(param_shapes(config))
    head = init_projection(config, seed) if config.projection_dim else {}
    for i, p in enumerate(sorted(set(shapes) - known)):
        value = head[p[-1]] if p[0] == "projection" else lora.init_adapter(
            p, shapes[p].shape, config, jax.random.fold_in(jax.random.PRNGKey(seed), i))
        params[p] = jax.device_put(value, flat_sh[p])
    return traverse_util.unflatten_dict(params)


def load(path: str, *, dtype: str | None = None, param_dtype: str | None = None,
         shardings_for=None):
    """(params, ModelConfig) from path. ``shardings_for(config)`` gives the target shardings
    (default: everything on the first device); ``dtype``/``param_dtype`` override the stored
    compute and parameter dtypes (parameters are cast while they are read)."""
    config = read_config(path)
    changes = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v}
    if source_kind(path) == "hf" and not param_dtype:
        changes.setdefault("param_dtype", config.param_dtype)
    config = config.replace(**changes) if changes else config
    if shardings_for is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, param_shapes(config))
    else:
        shardings = shardings_for(config)
    return load_params(path, config, shardings), config


def read_hf_sharded(hf_dir: str, config: ModelConfig, target):
    """Parameters from a Hugging Face directory, each device's shard read on its own: for every
    grit array, the callback reads exactly its slice of each HF tensor (per layer, per expert)."""
    files = checked_files(hf_dir, config)
    slots: dict[tuple, list] = {}
    for name, path, index, kind in hf_tensor_slots(config):
        slots.setdefault(path, []).append((name, index, kind))
    flat_target = traverse_util.flatten_dict(target)
    out = {}
    for path, want in flat_target.items():
        # The files are opened (memory-mapped) for one grit array at a time: a map counts the
        # pages read through it as resident until it is closed, so holding every file open for
        # the whole load would add the checkpoint's size to the peak.
        with contextlib.ExitStack() as stack:
            handles = {}

            def tensor(name):
                f = files[name]
                if f not in handles:
                    handles[f] = stack.enter_context(open_safetensors(f))
                try:
                    return handles[f].get_slice(key_in_file(name, f))
                except Exception as e:  # a tensor listed in the index but absent from its file
                    raise ValueError(f"{f}: cannot read tensor {name}: {e}") from None

            out[path] = _sharded_array(want, slots[path], tensor, config)
    return traverse_util.unflatten_dict(out)


def _sharded_array(want, slots, tensor, config: ModelConfig):
    """One grit array assembled per device from its HF tensors (see read_hf_sharded)."""
    dtype = np.dtype(want.dtype)
    for name, index, _ in slots:  # shapes first: a wrong checkpoint fails before any read
        expect = _hf_shape(config, name, slot_shape(want.shape, index))
        got = tuple(tensor(name).get_shape())
        if got != expect:
            raise ValueError(f"tensor {name} has shape {got}, expected {expect}")
    by_index = {index: (name, kind) for name, index, kind in slots}
    lead = 0 if None in by_index else (2 if isinstance(slots[0][1], tuple) else 1)
    d = config.resolved_head_dim
    cache: dict[tuple, np.ndarray] = {}

    def block(index):
        index = tuple(slice(*s.indices(n)) for s, n in zip(index, want.shape))
        key = tuple((s.start, s.stop) for s in index)
        if key in cache:  # replicated dimensions ask for the same block on several devices
            return cache[key]
        rest = index[lead:]
        if lead == 0:
            name, kind = by_index[None]
            arr = read_block(tensor(name), kind, rest, d)
        else:
            ranges = [range(s.start, s.stop) for s in index[:lead]]
            # filled in place, one layer (and expert) at a time: no second copy
            arr = np.empty(tuple(s.stop - s.start for s in index), dtype)
            rows = arr.reshape((-1,) + arr.shape[lead:])
            for k, ij in enumerate(itertools.product(*ranges)):
                name, kind = by_index[ij if lead == 2 else ij[0]]
                rows[k] = read_block(tensor(name), kind, rest, d)
        cache[key] = arr = np.ascontiguousarray(arr.astype(dtype, copy=False))
        return arr

    return jax.make_array_from_callback(want.shape, want.sharding, block)
