"""GritLM: one model that embeds (bidirectional, pooled) and generates (causal), from Python.

Mirrors the official ``gritlm.GritLM`` interface (``encode``, ``encode_queries``,
``encode_corpus``, ``generate``) so code can switch between them.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np

from grit_jax.config import CONFIG_FILE, ModelConfig
from grit_jax.data import formats
from grit_jax.data.tokenizers import Tokenizer, load_tokenizer
from grit_jax.embedding import embed, embedding_attention
from grit_jax.generation import Sampling, generate_ids
from grit_jax.pooling import POOLING_METHODS


def load_model(path: str, *, dtype: str | None = None):
    """(params, ModelConfig) from a params directory, a training workdir (latest checkpoint) or a
    Hugging Face directory."""
    from grit_jax import checkpoint

    if checkpoint.is_workdir(path):
        params, config, _ = checkpoint.load_params_from_workdir(path)
    elif os.path.exists(os.path.join(path, CONFIG_FILE)):
        from grit_jax.checkpoint import load_params

        params, config = load_params(path)
    elif os.path.exists(os.path.join(path, "config.json")):
        from grit_jax.convert.hf import read_hf

        config, params = read_hf(path)
    else:
        raise FileNotFoundError(f"{path}: neither a grit_jax params directory ({CONFIG_FILE}) nor "
                                f"a Hugging Face model directory (config.json)")
    if dtype is not None:
        config = config.replace(dtype=dtype)
    return params, config


class GritLM:
    """Embed with ``encode`` and chat with ``generate``, on the same weights."""

    def __init__(self, params, config: ModelConfig, tokenizer: Tokenizer, *,
                 mode: str = "unified", pooling_method: str = "mean", normalized: bool = True,
                 attn: str = "bbcc", embed_eos: str = ""):
        if mode not in ("unified", "embedding", "generative"):
            raise ValueError(f"mode must be unified, embedding or generative, got {mode!r}")
        if pooling_method not in POOLING_METHODS:
            raise ValueError(f"pooling_method must be one of {POOLING_METHODS}, got {pooling_method!r}")
        self.params, self.config, self.tokenizer = params, config, tokenizer
        self.mode, self.pooling_method, self.normalized = mode, pooling_method, normalized
        self.attn, self.embed_eos = attn, embed_eos
        self.embed_mode = embedding_attention(attn)

    @classmethod
    def from_pretrained(cls, path: str, *, tokenizer: str | None = None, dtype: str | None = None,
                        **kw) -> "GritLM":
        """Load from a params directory or a Hugging Face directory (tokenizer files inside)."""
        params, config = load_model(path, dtype=dtype)
        return cls(params, config, load_tokenizer(tokenizer or path), **kw)

    # ------------------------------------------------------------------------------------------
    # Embedding
    # ------------------------------------------------------------------------------------------
    def tokenize_for_embedding(self, sentences: Sequence[str], instruction: str = "",
                               max_length: int = 512) -> list[formats.Encoded]:
        """GRIT-format tokens and pooling masks (exact instruction spans)."""
        return [formats.encode_embed(self.tokenizer, s, instruction, max_length=max_length,
                                     embed_eos=self.embed_eos, where=f"sentence {i}")
                for i, s in enumerate(sentences)]

    def encode(self, sentences: str | Sequence[str], instruction: str = "", *,
               batch_size: int = 64, max_length: int = 512) -> np.ndarray:
        """Float32 embeddings (N, E) ((E,) for one string); independent of batch composition.

        ``instruction`` is the task text (``"Retrieve relevant passages"``) or an already
        formatted prefix such as the reference's ``gritlm_instruction(...)``.
        """
        single = isinstance(sentences, str)
        sentences = [sentences] if single else list(sentences)
        if not sentences:
            return np.zeros((0, self.config.hidden_size), np.float32)
        encoded = self.tokenize_for_embedding(sentences, instruction, max_length)
        order = np.argsort([-len(e) for e in encoded], kind="stable")  # long first: fewer pads
        buckets = formats.length_buckets(max(max_length, 16))
        out = np.zeros((len(sentences), self.config.hidden_size), np.float32)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            rows = [encoded[i] for i in idx]
            length = formats.bucket_length(max(len(r) for r in rows), buckets)
            ids, valid, mask = formats.pad_batch(rows, length, self.tokenizer.pad_id)
            reps = embed(self.params, self.config, ids, valid, mask, mode=self.embed_mode,
                         pooling=self.pooling_method, normalize=self.normalized)
            out[idx] = np.asarray(reps)
        return out[0] if single else out

    def encode_queries(self, queries, **kw) -> np.ndarray:
        """Encode retrieval queries (pass ``instruction=``)."""
        return self.encode(queries, **kw)

    def encode_corpus(self, corpus, **kw) -> np.ndarray:
        """Encode documents: strings or dicts with ``text`` and optional ``title``."""
        if isinstance(corpus, dict):
            corpus = [corpus]
        docs = [(d["title"] + " " + d["text"] if d.get("title") else d["text"])
                if isinstance(d, dict) else d for d in corpus]
        return self.encode(docs, **kw)

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------
    def generate(self, prompts, *, max_new_tokens: int = 64, greedy: bool = True,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 batch_size: int = 16) -> str | list[str]:
        """Replies: one prompt (a string or a chat as a list of role dicts) or a list of prompts."""
        single = isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], dict))
        prompts = [prompts] if single else list(prompts)
        encoded = [formats.encode_chat(self.tokenizer, p, add_generation_prompt=True)
                   for p in prompts]
        limit = self.config.max_position_embeddings
        buckets = formats.length_buckets(limit)
        sampling = Sampling(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)
        eos = self.tokenizer.eos_id if self.tokenizer.eos_id is not None else -1
        replies = [""] * len(prompts)
        rng = jax.random.PRNGKey(seed)
        for start in range(0, len(prompts), batch_size):
            rows = encoded[start:start + batch_size]
            length = formats.bucket_length(max(len(r) for r in rows), buckets)
            if length + max_new_tokens > limit:
                raise ValueError(f"prompt ({length} tokens, bucketed) + max_new_tokens="
                                 f"{max_new_tokens} exceeds max_position_embeddings={limit}")
            ids, valid, _ = formats.pad_batch(rows, length, self.tokenizer.pad_id)
            rng, key = jax.random.split(rng)
            out, n = generate_ids(self.params, self.config, ids, valid, key,
                                  max_new_tokens=max_new_tokens, sampling=sampling, eos_id=eos)
            out, n = np.asarray(out), np.asarray(n)
            for j in range(len(rows)):
                toks = [int(t) for t in out[j, :n[j]] if t != eos]
                replies[start + j] = self.tokenizer.decode(toks)
        return replies[0] if single else replies
