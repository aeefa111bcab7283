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
        try:
            params = ckptr.restore(path, abstract)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{path}: does not match the model in {directory}/grit_config.json "
                             f"({e})") from e
    if as_numpy:
        params = jax.tree.map(np.asarray, params)
    return params, config
