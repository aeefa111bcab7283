"""The RAG prompt texts of GRIT (paper section 4): what follows each kind of cached prefix.

Every cached prefix is an embedding input ``<s><|embed|>\\n{text}``: the states of the pass that
embeds a query or a document. The generation prompt then continues the cached text; the wording
tells the model where the query and the context are. Several documents are joined with a blank
line, in rank order (best first).
"""

from __future__ import annotations

from typing import Sequence

# Each caching mode: the cached parts, in the order their key/value states are chained.
CACHE_PARTS = {"query": ("query",), "doc": ("doc",), "query-doc": ("query", "doc"),
               "doc-query": ("doc", "query")}
CACHE_MODES = tuple(CACHE_PARTS)

QUERY_FIRST = "Optionally using the prior context answer the query prior to it"
DOC_FIRST = "Answer the prior query while optionally using the context prior to it"


def join_docs(docs: Sequence[str]) -> str:
    """Documents as one context text."""
    return "\n\n".join(docs)


def no_retrieval(query: str) -> str:
    """A plain chat turn (after BOS): no context."""
    return f"<|user|>\n{query}\n<|assistant|>\n"


def full_rag(query: str, docs: Sequence[str]) -> str:
    """Plain RAG (after BOS): query and documents in one user turn, nothing cached."""
    return f"<|user|>\n{query}\n\n{join_docs(docs)}\n\n{QUERY_FIRST}\n<|assistant|>\n"


def after_cache(cache: str, query: str, docs: Sequence[str]) -> str:
    """The prompt that continues a cached prefix, for each caching mode.

    query: the query is cached, the documents follow. doc: the documents are cached, the query
    follows. query-doc / doc-query: both are cached in that order; only the request follows.
    """
    if cache == "query":
        return f"\n<|user|>\n{join_docs(docs)}\n\n{QUERY_FIRST}\n<|assistant|>\n"
    if cache == "doc":
        return f"\n<|user|>\n{query}\n\n{DOC_FIRST}\n<|assistant|>\n"
    if cache == "query-doc":
        return f"\n<|user|>\n{QUERY_FIRST}\n<|assistant|>\n"
    if cache == "doc-query":
        return f"\n<|user|>\n{DOC_FIRST}\n<|assistant|>\n"
    raise ValueError(f"cache must be one of {CACHE_MODES} or None, got {cache!r}")
