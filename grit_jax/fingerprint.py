"""A model's identity for stored artifacts (RAG key/value caches, indexes): config, tokenizer,
weights.

The weights enter through a strided sample of every parameter (at most 9 values per axis),
read exactly (no arithmetic), so the fingerprint is cheap for a 7B model, equal for any
sharding of the same weights, and changes when training changes the weights.
"""

from __future__ import annotations

import functools
import hashlib
import json

import jax
import numpy as np

from grit_jax.config import ModelConfig
from grit_jax.data.tokenizers import tokenizer_fingerprint
from grit_jax.model import is_per_layer


def _sample(leaf) -> np.ndarray:
    index = tuple(slice(None, None, max(1, d // 8)) for d in leaf.shape)
    return np.asarray(jax.device_get(leaf[index]), np.float32)


def model_fingerprint(params, config: ModelConfig, tokenizer=None) -> str:
    """Hex sha256 over the config, the tokenizer's identity and sampled parameter values."""
    h = hashlib.sha256()
    h.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    if tokenizer is not None:
        h.update(json.dumps(tokenizer_fingerprint(tokenizer), sort_keys=True).encode())
    for name, shape, sample in _stacked_samples(params):
        h.update(name.encode())
        h.update(str(shape).encode())
        h.update(sample.tobytes())
    return h.hexdigest()


def _stacked_samples(params):
    """(path, shape, sample) per parameter as the scanned layout has it, for stacked and
    per-layer params alike (grit_jax.model.split_layers), so both give one fingerprint."""
    if not is_per_layer(params):
        for path, leaf in jax.tree_util.tree_leaves_with_path(params):
            yield jax.tree_util.keystr(path), tuple(leaf.shape), _sample(leaf)
        return
    n = sum(1 for k in params if k.startswith("layer_"))
    layers = [params[f"layer_{i}"] for i in range(n)]
    merged = {k: v for k, v in params.items() if not k.startswith("layer_")}
    merged["layers"] = layers[0]
    picked = range(0, n, max(1, n // 8))  # the layers _sample takes from a stack of n
    for path, leaf in jax.tree_util.tree_leaves_with_path(merged):
        if path[0].key != "layers":
            yield jax.tree_util.keystr(path), tuple(leaf.shape), _sample(leaf)
            continue
        rest = path[1:]
        at = lambda tree: functools.reduce(lambda t, k: t[k.key], rest, tree)  # noqa: E731
        yield (jax.tree_util.keystr(path), (n, *leaf.shape),
               np.stack([_sample(at(layers[i])) for i in picked]))
