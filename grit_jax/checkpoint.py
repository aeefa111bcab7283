"""Orbax params checkpoints: ``DIR/params`` (the weights) beside ``DIR/grit_config.json``."""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from grit_jax.config import ModelConfig

PARAMS_SUBDIR = "params"


def save_params(directory: str, params, config: ModelConfig) -> str:
    """Write params with Orbax and the model config as JSON; returns the params path."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, PARAMS_SUBDIR)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params, force=True)
    config.save(directory)
    return path


def load_params(directory: str, *, shardings=None, as_numpy: bool = False):
    """(params, ModelConfig) from a params directory; optionally placed with ``shardings``."""
    directory = os.path.abspath(directory)
    config = ModelConfig.load(directory)
    path = os.path.join(directory, PARAMS_SUBDIR)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no Orbax params checkpoint here")
    from grit_jax.model import abstract_params
    import flax.linen as nn

    abstract = nn.unbox(abstract_params(config))
    if shardings is not None:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        _check_matches(ckptr.metadata(path).item_metadata.tree, abstract, path, directory)
        params = ckptr.restore(path, abstract)
    if as_numpy:
        params = jax.tree.map(np.asarray, params)
    return params, config


def _check_matches(stored, abstract, path: str, directory: str) -> None:
    """Orbax restores stored shapes whatever the target says: compare them first, by name."""
    from flax.traverse_util import flatten_dict

    have = {"/".join(k): tuple(v.shape) for k, v in flatten_dict(stored).items()}
    want = {"/".join(k): tuple(v.shape) for k, v in flatten_dict(abstract).items()}
    problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
    problems += [f"{k} has shape {have[k]}, config expects {want[k]}"
                 for k in sorted(set(have) & set(want)) if have[k] != want[k]]
    if problems:
        raise ValueError(f"{path}: does not match the model in "
                         f"{os.path.join(directory, 'grit_config.json')}: " + "; ".join(problems[:6]))


def latest_step(workdir: str) -> int | None:
    """The newest finished checkpoint step of a training workdir (None if none)."""
    root = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(root):
        return None
    steps = [int(d) for d in os.listdir(root)
             if d.isdigit() and os.path.exists(os.path.join(root, d, "state"))]
    return max(steps) if steps else None


def is_workdir(path: str) -> bool:
    """Whether path is a training workdir (``checkpoints/`` beside ``grit_config.json``)."""
    return os.path.isdir(os.path.join(path, "checkpoints"))


def load_params_from_workdir(workdir: str, step: int | None = None):
    """(params, ModelConfig, step) from a training workdir, reading only the parameters."""
    workdir = os.path.abspath(workdir)
    config = ModelConfig.load(workdir)
    step = latest_step(workdir) if step is None else step
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    if step is None or not os.path.isdir(path):
        raise FileNotFoundError(f"{workdir}: no checkpoint{'' if step is None else f' for step {step}'}"
                                f" under checkpoints/")
    from grit_jax.model import abstract_params
    import flax.linen as nn

    abstract = nn.unbox(abstract_params(config))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(dtype=a.dtype, sharding=device),
                                abstract)
    with ocp.PyTreeCheckpointer() as ckptr:
        _check_matches(ckptr.metadata(path).item_metadata.tree["params"], abstract, path, workdir)
        restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(
            item={"params": abstract}, restore_args={"params": restore_args}, partial_restore=True))
    return restored["params"], config, step
