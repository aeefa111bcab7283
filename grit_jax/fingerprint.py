"""A model's identity for stored artifacts (RAG key/value caches, indexes): config, tokenizer, weights.

The weights enter through a strided sample of every parameter (at most 9 values per axis),
read exactly (no arithmetic), so the fingerprint is cheap for a 7B model, equal for any
sharding of the same weights, and changes when training changes the weights.
"""

from __future__ import annotations

import hashlib
import json

import jax
import numpy as np

from grit_jax.config import ModelConfig


def _sample(leaf) -> np.ndarray:
    index = tuple(slice(None, None, max(1, d // 8)) for d in leaf.shape)
    return np.asarray(jax.device_get(leaf[index]), np.float32)


def model_fingerprint(params, config: ModelConfig, tokenizer=None) -> str:
    """Hex sha256 over the config, the tokenizer's identity and sampled parameter values."""
    from grit_jax.data.tokenizers import tokenizer_fingerprint

    h = hashlib.sha256()
    h.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    if tokenizer is not None:
        h.update(json.dumps(tokenizer_fingerprint(tokenizer), sort_keys=True).encode())
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(tuple(leaf.shape)).encode())
        h.update(_sample(leaf).tobytes())
    return h.hexdigest()
