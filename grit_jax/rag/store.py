"""Documents' key/value states on disk, memory-mapped: the "doc" side of GRIT's RAG caching.

Layout of a store directory::

    meta.json     model fingerprint, attention, shapes, dtype, number of docs and tokens
    offsets.npy   (N + 1,) int64: document i owns tokens offsets[i] .. offsets[i+1]-1
    tokens.npy    (T,) int32: the cached token ids (``<s><|embed|>\\n{doc}``)
    kv.bin        (T, 2, layers, kv_heads, head_dim) raw, in the model's compute dtype

Reading document i maps only its rows (a contiguous slice), so a store far larger than memory
serves one document at a time. A store is tied to the model that wrote it: opening it with a
model of another fingerprint or embedding attention is refused.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from grit_jax.prefix_cache import PrefixCache

FORMAT = "grit_jax.kv_store/1"
META, OFFSETS, TOKENS, KV = "meta.json", "offsets.npy", "tokens.npy", "kv.bin"


class StoreMismatch(ValueError):
    """The store was written by another model (or for another attention mode)."""


class DocCacheWriter:
    """Appends documents' PrefixCaches in order; ``close`` writes the index files."""

    def __init__(self, directory: str, *, fingerprint: str, attn: str, config):
        os.makedirs(directory, exist_ok=True)
        self.directory, self.config = directory, config
        self.meta = {"format": FORMAT, "fingerprint": fingerprint, "attn": attn,
                     "layers": config.num_layers, "kv_heads": config.num_kv_heads,
                     "head_dim": config.resolved_head_dim,
                     "dtype": jnp.dtype(config.jnp_dtype).name}
        self.dtype = np.dtype(jnp.dtype(config.jnp_dtype))
        self._file = open(os.path.join(directory, KV), "wb")
        self._offsets, self._tokens = [0], []

    def add(self, cache: PrefixCache) -> None:
        cache.check_model(self.config)
        rows = np.stack([cache.k, cache.v]).astype(self.dtype)  # (2, L, n, G, D)
        self._file.write(np.ascontiguousarray(rows.transpose(2, 0, 1, 3, 4)).tobytes())
        self._tokens.append(np.asarray(cache.ids, np.int32))
        self._offsets.append(self._offsets[-1] + len(cache))

    def close(self) -> None:
        self._file.close()
        tokens = np.concatenate(self._tokens) if self._tokens else np.zeros((0,), np.int32)
        np.save(os.path.join(self.directory, OFFSETS), np.asarray(self._offsets, np.int64))
        np.save(os.path.join(self.directory, TOKENS), tokens)
        self.meta.update(docs=len(self._offsets) - 1, tokens=int(self._offsets[-1]))
        with open(os.path.join(self.directory, META), "w") as f:
            json.dump(self.meta, f, indent=1)


class DocCacheStore:
    """Read side: ``store[i]`` is document i's PrefixCache (views into the memory map)."""

    def __init__(self, directory: str, *, fingerprint: str | None = None,
                 attn: str | None = None):
        self.directory = directory
        meta_path = os.path.join(directory, META)
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{meta_path}: missing (no key/value store here)")
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{meta_path}: unreadable ({e})") from e
        missing = [k for k in ("format", "fingerprint", "attn", "layers", "kv_heads", "head_dim",
                               "dtype", "docs", "tokens") if k not in self.meta]
        if missing or self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: not a {FORMAT} store (missing {missing or 'format'})")
        if fingerprint is not None and self.meta["fingerprint"] != fingerprint:
            raise StoreMismatch(f"{directory}: these key/value states were computed by another "
                                f"model (fingerprint {self.meta['fingerprint'][:12]}..., this "
                                f"model {fingerprint[:12]}...); rebuild the index with this model")
        if attn is not None and self.meta["attn"] != attn:
            raise StoreMismatch(f"{directory}: states computed with attn={self.meta['attn']!r}, "
                                f"the model runs attn={attn!r}")
        self.offsets = _load_npy(os.path.join(directory, OFFSETS), np.int64,
                                 (self.meta["docs"] + 1,))
        self.tokens = _load_npy(os.path.join(directory, TOKENS), np.int32, (self.meta["tokens"],))
        if self.offsets[0] != 0 or self.offsets[-1] != self.meta["tokens"] or (
                np.diff(self.offsets) < 0).any():
            raise ValueError(f"{os.path.join(directory, OFFSETS)}: offsets are not a partition of "
                             f"{self.meta['tokens']} tokens")
        row = (2, self.meta["layers"], self.meta["kv_heads"], self.meta["head_dim"])
        self.dtype = np.dtype(jnp.dtype(self.meta["dtype"]))
        kv_path = os.path.join(directory, KV)
        if not os.path.exists(kv_path):
            raise FileNotFoundError(f"{kv_path}: missing")
        want = self.meta["tokens"] * int(np.prod(row)) * self.dtype.itemsize
        if os.path.getsize(kv_path) != want:
            raise ValueError(f"{kv_path}: {os.path.getsize(kv_path)} bytes, expected {want} "
                             f"(truncated or from another build)")
        self._kv = (np.memmap(kv_path, dtype=self.dtype, mode="r",
                              shape=(self.meta["tokens"],) + row)
                    if self.meta["tokens"] else np.zeros((0,) + row, self.dtype))

    def __len__(self):
        return self.meta["docs"]

    def __getitem__(self, i: int) -> PrefixCache:
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} is not in the store ({len(self)} documents)")
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        rows = np.asarray(self._kv[a:b]).transpose(1, 2, 0, 3, 4)  # (2, L, n, G, D)
        return PrefixCache(np.asarray(self.tokens[a:b]), rows[0], rows[1])


def _load_npy(path: str, dtype, shape) -> np.ndarray:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npy array ({e})") from e
    if arr.dtype != dtype or arr.shape != shape:
        raise ValueError(f"{path}: expected {np.dtype(dtype).name} {shape}, found {arr.dtype} "
                         f"{arr.shape}")
    return arr
