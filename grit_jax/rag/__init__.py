"""RAG with one GRIT model: dense index, on-disk document key/value store, four caching modes."""

from grit_jax.rag.index import DenseIndex
from grit_jax.rag.pipeline import RAG, Answer, read_corpus
from grit_jax.rag.prompts import CACHE_MODES
from grit_jax.rag.store import DocCacheStore, StoreMismatch

__all__ = ["CACHE_MODES", "RAG", "Answer", "DenseIndex", "DocCacheStore", "StoreMismatch",
           "read_corpus"]
