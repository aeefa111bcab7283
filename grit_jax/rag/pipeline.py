"""Retrieval-augmented generation with one GRIT model: index, retrieve, answer with caching.

The embedding pass that indexes a document (``<s><|embed|>\\n{doc}``) also yields its key/value
states; they are stored (``store.py``) and generation continues them instead of reading the
document again. Modes of ``RAG.answer``:

- ``retrieval=False``: no context, a plain chat turn.
- ``cache=None``: plain RAG, query and documents in one prompt, nothing reused.
- ``"query"``: the query's embedding-pass states are reused; the documents follow as text.
- ``"doc"``: the documents' stored states are reused; the query follows as text.
- ``"query-doc"`` / ``"doc-query"``: both reused, in that order; a short request follows.

With several documents (``top_k > 1``) or two cached parts, the parts are joined as described in
``grit_jax.prefix_cache`` (keys re-rotated to their joined positions unless ``rerotate=False``).
With causal embedding attention (``attn="cccc"``) the embedding pass computes exactly the states
generation would, so doc- and query-cached answers equal the uncached answers token for token.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np

from grit_jax import outputs
from grit_jax.data.records import RecordError, iter_jsonl
from grit_jax.generation import Sampling
from grit_jax.inference import GritLM, document_text
from grit_jax.prefix_cache import PrefixCache, join
from grit_jax.rag import prompts
from grit_jax.rag.index import DenseIndex
from grit_jax.rag.store import DocCacheStore, DocCacheWriter, StoreMismatch

FORMAT = "grit_jax.rag_index/1"
INDEX_META, DOCS, KV_DIR = "index.json", "docs.jsonl", "kv"


@dataclasses.dataclass
class Answer:
    """One generated answer and what it was conditioned on."""

    text: str
    tokens: list[int]
    doc_ids: list[int]  # rows of the index, best first
    scores: list[float]
    cached_tokens: int  # prefix tokens whose states were reused
    prompt_tokens: int  # tokens the model read for this answer


def read_corpus(path: str) -> list[dict]:
    """Documents from JSONL: ``{"text": str, "title": str (optional), "id": any (optional)}``."""
    docs = []
    for line, obj in iter_jsonl(path):
        if isinstance(obj, RecordError):
            raise obj
        if not isinstance(obj, dict):
            raise RecordError(path, line, None, "expected a JSON object", "not_object")
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            raise RecordError(path, line, "text", "missing or empty (a non-empty string is needed)",
                              "no_text")
        title = obj.get("title", "")
        if not isinstance(title, str):
            raise RecordError(path, line, "title", f"expected a string, got {type(title).__name__}",
                              "bad_title")
        docs.append({"id": obj.get("id", len(docs)), "title": title, "text": text})
    if not docs:
        raise ValueError(f"{path}: no documents")
    return docs


class RAG:
    """A GritLM, an index over a corpus and (optionally) the corpus's key/value store."""

    def __init__(self, model: GritLM, docs: Sequence[dict], index: DenseIndex,
                 store: DocCacheStore | None = None, *, query_instruction: str = ""):
        if len(docs) != len(index):
            raise ValueError(f"{len(docs)} documents but {len(index)} index rows")
        if store is not None and len(store) != len(docs):
            raise ValueError(f"{len(docs)} documents but {len(store)} cached documents")
        self.model, self.docs, self.index, self.store = model, list(docs), index, store
        self.query_instruction = query_instruction

    # ------------------------------------------------------------------------------------------
    # Building and loading
    # ------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, model: GritLM, docs: Sequence[dict | str], directory: str, *,
              cache_docs: bool = True, batch_size: int = 8, max_length: int | None = None,
              backend: str = "auto", query_instruction: str = "",
              overwrite: bool = False) -> "RAG":
        """Embed the corpus (and store its key/value states) into ``directory``; return the RAG.

        Documents longer than ``max_length`` tokens (default: the model's maximum) are
        truncated; the number is in ``index.json``. The index is written whole or not at all; a
        folder that holds files is replaced only with ``overwrite``.
        """
        docs = [d if isinstance(d, dict) else {"text": d} for d in docs]
        if not docs:
            raise ValueError("RAG.build: no documents")
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size}: must be > 0")
        limit = model.config.max_position_embeddings
        if max_length is not None and not 0 < max_length <= limit:
            raise ValueError(f"max_length={max_length}: must be in [1, {limit}] (the model's "
                             f"max_position_embeddings)")
        docs = [{"id": d.get("id", i), "title": d.get("title", ""), "text": d["text"]}
                for i, d in enumerate(docs)]
        max_length = max_length or limit
        with outputs.staged_dir(directory, overwrite=overwrite) as staging:
            writer = (DocCacheWriter(os.path.join(staging, KV_DIR), fingerprint=model.fingerprint,
                                     attn=model.attn, config=model.config) if cache_docs else None)
            emb = np.zeros((len(docs), model.config.embedding_dim), np.float32)
            # tokenized once: one warning counts the truncated documents
            encoded = model.tokenize_for_embedding([document_text(d) for d in docs], "",
                                                   max_length)
            truncated = sum(bool(e.cut) for e in encoded)
            for start in range(0, len(docs), batch_size):
                chunk = encoded[start:start + batch_size]
                if cache_docs:
                    emb[start:start + len(chunk)], caches = model.encode_tokens(
                        chunk, batch_size=batch_size, max_length=max_length, get_cache=True)
                    for c in caches:
                        writer.add(c)
                else:
                    emb[start:start + len(chunk)] = model.encode_tokens(
                        chunk, batch_size=batch_size, max_length=max_length)
            if writer is not None:
                writer.close()
            DenseIndex(emb).save(staging)
            with open(os.path.join(staging, DOCS), "w") as f:
                for d in docs:
                    f.write(json.dumps(d, ensure_ascii=False) + "\n")
            meta = {"format": FORMAT, "fingerprint": model.fingerprint, "attn": model.attn,
                    "pooling_method": model.pooling_method, "normalized": model.normalized,
                    "embed_eos": model.embed_eos, "docs": len(docs), "dim": emb.shape[1],
                    "max_length": max_length, "truncated_docs": int(truncated),
                    "cached": bool(cache_docs)}
            with open(os.path.join(staging, INDEX_META), "w") as f:
                json.dump(meta, f, indent=1)
        return cls.load(directory, model, backend=backend, query_instruction=query_instruction)

    @classmethod
    def load(cls, directory: str, model: GritLM, *, backend: str = "auto",
             query_instruction: str = "") -> "RAG":
        """Open an index built by ``build``; refuses one built by another model or setup."""
        meta_path = os.path.join(directory, INDEX_META)
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{meta_path}: missing (not a grit_jax RAG index)")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{meta_path}: unreadable ({e})") from e
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: not a {FORMAT} index")
        if meta["fingerprint"] != model.fingerprint:
            raise StoreMismatch(f"{directory}: built by another model (fingerprint "
                                f"{meta['fingerprint'][:12]}..., this model "
                                f"{model.fingerprint[:12]}...); rebuild it with this model")
        for key in ("attn", "pooling_method", "normalized", "embed_eos"):
            if meta[key] != getattr(model, key):
                raise StoreMismatch(f"{directory}: built with {key}={meta[key]!r}, the model "
                                    f"has {key}={getattr(model, key)!r}")
        docs_path = os.path.join(directory, DOCS)
        if not os.path.exists(docs_path):
            raise FileNotFoundError(f"{docs_path}: missing")
        docs = read_corpus(docs_path)
        if len(docs) != meta["docs"]:
            raise ValueError(f"{docs_path}: {len(docs)} documents, {meta_path} says {meta['docs']}")
        index = DenseIndex.load(directory, backend=backend, expect_rows=meta["docs"],
                                expect_dim=model.config.embedding_dim)
        store = None
        if meta["cached"]:
            store = DocCacheStore(os.path.join(directory, KV_DIR), fingerprint=model.fingerprint,
                                  attn=model.attn)
        rag = cls(model, docs, index, store, query_instruction=query_instruction)
        rag.meta = meta
        return rag

    # ------------------------------------------------------------------------------------------
    # Retrieval and answers
    # ------------------------------------------------------------------------------------------
    def retrieve(self, queries: Sequence[str], top_k: int = 1, *, max_length: int | None = None):
        """(scores, doc rows), each (Q, top_k), best first."""
        emb = self.model.encode_queries(list(queries), instruction=self.query_instruction,
                                        max_length=max_length)
        return self.index.search(emb, top_k)

    def answer(self, queries: str | Sequence[str], *, cache: str | None = None,
               retrieval: bool = True, top_k: int = 1, max_new_tokens: int = 16,
               answer_prefix: str = "", rerotate: bool = True, drop_inner_bos: bool = True,
               query_max_length: int | None = None, batch_size: int = 8,
               sampling: Sampling = Sampling(), seed: int = 0,
               stop_at_eos: bool = True) -> Answer | list[Answer]:
        """Answer each query, with retrieval and the chosen caching mode (module docstring).

        ``answer_prefix`` starts the assistant's reply (the paper's evaluation uses
        ``"The answer is"``); ``sampling``, ``seed`` and ``stop_at_eos``: as
        ``GritLM.generate_tokens`` (greedy by default).
        """
        single = isinstance(queries, str)
        queries = [queries] if single else list(queries)
        if not queries:
            raise ValueError("answer: no queries given")
        for i, q in enumerate(queries):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"query {i} is empty")
        if cache is not None and cache not in prompts.CACHE_MODES:
            raise ValueError(f"cache must be one of {prompts.CACHE_MODES} or None, got {cache!r}")
        if not retrieval and cache is not None:
            raise ValueError(f"cache={cache!r} needs retrieval (retrieval=False has no context)")
        cached = prompts.CACHE_PARTS[cache] if cache is not None else ()
        if "doc" in cached and self.store is None:
            raise ValueError(f"cache={cache!r} needs the documents' key/value states, but this "
                             f"index was built without them (build with cache_docs=True)")
        tok, config = self.model.tokenizer, self.model.config
        n = len(queries)
        scores = np.zeros((n, 0), np.float32)
        rows = np.zeros((n, 0), np.int64)
        qcaches: list[PrefixCache] | None = None
        if retrieval:
            kw = dict(instruction=self.query_instruction, max_length=query_max_length)
            if "query" in cached:
                qemb, qcaches = self.model.encode(queries, get_cache=True, **kw)
            else:
                qemb = self.model.encode(queries, **kw)
            scores, rows = self.index.search(qemb, top_k)

        bos = [tok.bos_id] if tok.bos_id is not None else []
        prompt_ids, prefixes = [], []
        for i, q in enumerate(queries):
            texts = [document_text(self.docs[r]) for r in rows[i]]
            if not retrieval:
                prompt_ids.append(bos + tok.encode(prompts.no_retrieval(q) + answer_prefix))
                continue
            if cache is None:
                prompt_ids.append(bos + tok.encode(prompts.full_rag(q, texts) + answer_prefix))
                continue
            docs = [self.store[int(r)] for r in rows[i]] if "doc" in cached else []
            parts = {"query": [qcaches[i]] if qcaches else [], "doc": docs}
            chain = [p for name in cached for p in parts[name]]
            prefixes.append(chain[0] if len(chain) == 1 else join(
                chain, config, rerotate=rerotate, drop_inner_bos=drop_inner_bos,
                bos_id=tok.bos_id))
            prompt_ids.append(tok.encode(prompts.after_cache(cache, q, texts) + answer_prefix))

        out = self.model.generate_tokens(prompt_ids, prefixes=prefixes or None,
                                         max_new_tokens=max_new_tokens, batch_size=batch_size,
                                         sampling=sampling, seed=seed, stop_at_eos=stop_at_eos)
        answers = [Answer(text=tok.decode(t), tokens=t, doc_ids=[int(r) for r in rows[i]],
                          scores=[float(s) for s in scores[i]],
                          cached_tokens=len(prefixes[i]) if prefixes else 0,
                          prompt_tokens=len(prompt_ids[i]))
                   for i, t in enumerate(out)]
        return answers[0] if single else answers
