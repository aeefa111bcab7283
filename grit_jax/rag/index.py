"""Dense retrieval index: a float32 embedding matrix searched by exact inner product.

Search runs as one jitted matmul + ``lax.top_k`` in JAX (queries padded to a power of two, so a
handful of programs compile); with ``backend="faiss"`` (or ``"auto"`` on a large corpus when
faiss is installed) an exact ``faiss.IndexFlatIP`` does the same on the host. Embeddings are
L2-normalised by GritLM, so inner product is cosine similarity.
"""

from __future__ import annotations

import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

EMBEDDINGS_FILE = "embeddings.npy"
FAISS_MIN_DOCS = 100_000  # "auto" switches to faiss from this corpus size


@partial(jax.jit, static_argnames=("k",))
def _top_k(embeddings, queries, *, k: int):
    scores = jnp.einsum("qe,ne->qn", queries, embeddings, precision=jax.lax.Precision.HIGHEST)
    return jax.lax.top_k(scores, k)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class DenseIndex:
    """Exact top-k by inner product over an (N, E) float32 matrix."""

    def __init__(self, embeddings: np.ndarray, *, backend: str = "auto"):
        embeddings = np.asarray(embeddings, np.float32)
        if embeddings.ndim != 2 or not len(embeddings):
            raise ValueError(f"index embeddings must be a non-empty (N, E) matrix, got shape "
                             f"{embeddings.shape}")
        if not np.isfinite(embeddings).all():
            bad = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
            raise ValueError(f"index embeddings of documents {bad[:10].tolist()} are not finite")
        if backend not in ("auto", "jax", "faiss"):
            raise ValueError(f"backend must be auto, jax or faiss, got {backend!r}")
        if backend == "auto":
            backend = ("faiss" if (len(embeddings) >= FAISS_MIN_DOCS and faiss_available())
                       else "jax")
        if backend == "faiss" and not faiss_available():
            raise ImportError("backend='faiss' needs the faiss-cpu package (pip install faiss-cpu)")
        self.embeddings, self.backend = embeddings, backend
        self._device = None
        self._faiss = None

    def __len__(self):
        return len(self.embeddings)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (Q, k), best first, for queries (Q, E) or (E,)."""
        queries = np.asarray(queries, np.float32)
        single = queries.ndim == 1
        queries = queries[None] if single else queries
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries of shape {queries.shape} do not match the index "
                             f"dimension {self.dim}")
        if not 1 <= k <= len(self):
            raise ValueError(f"k={k} must be between 1 and the number of documents ({len(self)})")
        if self.backend == "faiss":
            scores, ids = self._faiss_index().search(queries, k)
        else:
            if self._device is None:
                self._device = jnp.asarray(self.embeddings)
            q = len(queries)
            padded = 1 << max(0, (q - 1).bit_length())
            queries = np.pad(queries, ((0, padded - q), (0, 0)))
            scores, ids = _top_k(self._device, queries, k=k)
            scores, ids = np.asarray(scores)[:q], np.asarray(ids)[:q]
        scores, ids = np.asarray(scores, np.float32), np.asarray(ids, np.int64)
        return (scores[0], ids[0]) if single else (scores, ids)

    def _faiss_index(self):
        if self._faiss is None:
            import faiss

            self._faiss = faiss.IndexFlatIP(self.dim)
            self._faiss.add(self.embeddings)
        return self._faiss

    def save(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, EMBEDDINGS_FILE)
        np.save(path, self.embeddings)
        return path

    @classmethod
    def load(cls, directory: str, *, backend: str = "auto", expect_rows: int | None = None,
             expect_dim: int | None = None) -> "DenseIndex":
        """Read ``embeddings.npy``; a missing, unreadable or mis-shaped file is a clear error."""
        path = os.path.join(directory, EMBEDDINGS_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: missing (not a grit_jax RAG index?)")
        try:
            emb = np.load(path, allow_pickle=False)
        except Exception as e:  # numpy raises ValueError/EOFError/OSError for damaged files
            raise ValueError(f"{path}: not a readable .npy matrix ({e})") from e
        if emb.ndim != 2 or emb.dtype != np.float32:
            raise ValueError(f"{path}: expected a float32 (N, E) matrix, found {emb.dtype} "
                             f"{emb.shape}")
        if expect_rows is not None and emb.shape[0] != expect_rows:
            raise ValueError(f"{path}: {emb.shape[0]} embeddings for {expect_rows} documents")
        if expect_dim is not None and emb.shape[1] != expect_dim:
            raise ValueError(f"{path}: embedding dimension {emb.shape[1]}, expected {expect_dim}")
        return cls(emb, backend=backend)
