"""GritLM: one model that embeds (bidirectional, pooled) and generates (causal), from Python.

Mirrors the official ``gritlm.GritLM`` interface (``encode``, ``encode_queries``,
``encode_corpus``, ``generate``) so code can switch between them.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Mapping, Sequence

import jax
import numpy as np

from grit_jax import sharding, weights
from grit_jax.config import ModelConfig
from grit_jax.data import formats
from grit_jax.data.tokenizers import Tokenizer, load_tokenizer
from grit_jax.embedding import embed, embed_with_cache, embedding_attention
from grit_jax.fingerprint import model_fingerprint
from grit_jax.generation import Sampling, generate_ids
from grit_jax.model import abstract_params, is_per_layer, split_layers
from grit_jax.pooling import POOLING_METHODS
from grit_jax.prefix_cache import PrefixCache, to_kv_cache

log = logging.getLogger(__name__)
DEFAULT_EMBED_LENGTH = 512
# Encode pads each batch to one of 4 lengths per octave (<= 25% padding, a few more compiles).
ENCODE_BUCKETS_PER_OCTAVE = 4
NEW_TOKENS_ROOM = 64  # least room for new tokens in a generate program (then 128, 256, ...)


class GritLM:
    """Embed with ``encode`` and chat with ``generate``, on the same weights.

    ``mesh``: run sharded (parameters laid out by ``grit_jax.sharding``'s rules) for models
    too large for one device.
    """

    def __init__(self, params, config: ModelConfig, tokenizer: Tokenizer, *,
                 mode: str = "unified", pooling_method: str = "mean", normalized: bool = True,
                 attn: str = "bbcc", embed_eos: str = "", mesh=None):
        if mode not in ("unified", "embedding", "generative"):
            raise ValueError(f"mode must be unified, embedding or generative, got {mode!r}")
        if pooling_method not in POOLING_METHODS:
            raise ValueError(f"pooling_method must be one of {POOLING_METHODS}, "
                             f"got {pooling_method!r}")
        self.config, self.tokenizer, self.mesh = config, tokenizer, mesh
        self.mode, self.pooling_method, self.normalized = mode, pooling_method, normalized
        self.attn, self.embed_eos = attn, embed_eos
        self.embed_mode = embedding_attention(attn)
        if mesh is not None:
            boxed = abstract_params(config)
            sharding.check_divisible(boxed, mesh)
            shardings = sharding.param_shardings(boxed, mesh)
            if is_per_layer(params):
                shardings = split_layers(shardings, config.num_layers)
            params = jax.device_put(params, shardings)
        # The scanned stack serves encoding (one layer body: its programs compile ~3x faster
        # and run as fast); the first generation splits it once into per-layer weights that
        # each decoded token reads in place instead of copying every layer out of the stack
        # (grit_jax.model.split_layers). Weights given here may be in either layout.
        self.params = params
        self._owns_params = False  # from_pretrained: the stack may be freed while it splits
        self._fingerprint = None

    @classmethod
    def from_pretrained(cls, path: str, *, tokenizer: str | None = None, dtype: str | None = None,
                        mesh_shape: Sequence[int] | Mapping[str, int] | None = None,
                        **kw) -> "GritLM":
        """Load a params directory, a training workdir, a Hugging Face directory or a GGUF file.

        ``mesh_shape`` (data, fsdp, tensor), e.g. ``(1, -1, 1)``, or a dict over the mesh axes
        (``{"fsdp": -1}``; see ``grit_jax.sharding.make_mesh``): shard over all devices.
        """
        shardings_for = None
        if mesh_shape is not None:  # read straight into the mesh's shardings
            mesh = kw["mesh"] = sharding.make_mesh(mesh_shape)

            def shardings_for(config):
                boxed = abstract_params(config)
                sharding.check_divisible(boxed, mesh)
                return sharding.param_shardings(boxed, mesh)
        params, config = weights.load(path, dtype=dtype, shardings_for=shardings_for)
        tokenizer = load_tokenizer(tokenizer or weights.tokenizer_path(path))
        model = cls(params, config, tokenizer, **kw)
        model._owns_params = True  # nothing else holds them
        return model

    def _decode_params(self):
        """Per-layer weights for decoding, split from the stack at the first call (each stacked
        array freed as it goes where this model loaded them itself)."""
        if not is_per_layer(self.params):
            self.params = split_layers(self.params, consume=self._owns_params)
        return self.params

    def _scope(self):
        """Mesh and sharding rules in scope for a jitted call (a no-op on one device)."""
        if self.mesh is None:
            return contextlib.nullcontext()

        return sharding.activate(self.mesh)

    @property
    def fingerprint(self) -> str:
        """Identity of weights + config + tokenizer (stored with caches and indexes)."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.params, self.config, self.tokenizer)
        return self._fingerprint

    # ------------------------------------------------------------------------------------------
    # Embedding
    # ------------------------------------------------------------------------------------------
    def tokenize_for_embedding(self, sentences: Sequence[str], instruction: str = "",
                               max_length: int | None = None) -> list[formats.Encoded]:
        """GRIT-format tokens and pooling masks (exact instruction spans); texts cut at
        ``max_length`` are counted in a warning."""
        max_length = self.embed_length(max_length)
        for i, s in enumerate(sentences):
            if not isinstance(s, str):
                raise TypeError(f"sentence {i}: expected a string, got {type(s).__name__}")
            if not s.strip():
                raise ValueError(f"sentence {i} is empty: there is no text to embed")
        encoded = [formats.encode_embed(self.tokenizer, s, instruction, max_length=max_length,
                                        embed_eos=self.embed_eos, where=f"sentence {i}")
                   for i, s in enumerate(sentences)]
        cut = [e.cut for e in encoded if e.cut]
        if cut:
            log.warning("encode: %d of %d inputs were longer than max_length=%d tokens and were "
                        "truncated at the end (%d tokens dropped in all)", len(cut), len(encoded),
                        max_length, sum(cut))
        return encoded

    def embed_length(self, max_length: int | None) -> int:
        """The token limit of an embedding: checked, or (None) min(512, the model's positions)."""
        if max_length is None:
            return min(DEFAULT_EMBED_LENGTH, self.config.max_position_embeddings)
        self._check_length("max_length", max_length)
        return int(max_length)

    def _check_length(self, name: str, value: int) -> None:
        limit = self.config.max_position_embeddings
        if not isinstance(value, (int, np.integer)) or not 1 <= value <= limit:
            raise ValueError(f"{name}={value!r}: must be an integer in [1, {limit}] (the model's "
                             f"max_position_embeddings)")

    def encode(self, sentences: str | Sequence[str], instruction: str = "", *,
               batch_size: int = 64, max_length: int | None = None, get_cache: bool = False):
        """Float32 embeddings (N, E) ((E,) for one string); independent of batch composition.

        ``instruction`` is the task text (``"Retrieve relevant passages"``) or an already
        formatted prefix such as the reference's ``gritlm_instruction(...)``. Texts longer than
        ``max_length`` tokens (default: 512, or the model's positions if fewer; instruction
        included) are truncated at the end, with a warning that counts them.
        ``get_cache=True`` also returns each input's ``PrefixCache`` (the key/value states of
        the embedding pass, for RAG caching).
        """
        single = isinstance(sentences, str)
        sentences = [sentences] if single else list(sentences)
        if not sentences:
            raise ValueError("encode: no sentences given")
        max_length = self.embed_length(max_length)
        encoded = self.tokenize_for_embedding(sentences, instruction, max_length)
        out = self.encode_tokens(encoded, batch_size=batch_size, max_length=max_length,
                                 get_cache=get_cache)
        if single:
            return (out[0][0], out[1][0]) if get_cache else out[0]
        return out

    def encode_tokens(self, encoded: Sequence[formats.Encoded], *, batch_size: int = 64,
                      max_length: int | None = None, get_cache: bool = False):
        """``encode`` of inputs already tokenized by ``tokenize_for_embedding`` (with the same
        ``max_length``): embeddings (N, E), and with ``get_cache`` each input's PrefixCache."""
        if not encoded:
            raise ValueError("encode: no inputs given")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be a positive integer")
        max_length = self.embed_length(max_length)
        order = np.argsort([-len(e) for e in encoded], kind="stable")  # long first: fewer pads
        buckets = formats.length_buckets(max(max_length, 16), per_octave=ENCODE_BUCKETS_PER_OCTAVE)
        out = np.zeros((len(encoded), self.config.embedding_dim),
                       np.float64 if self.config.dtype == "float64" else np.float32)
        caches: list[PrefixCache | None] = [None] * len(encoded)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            rows = [encoded[i] for i in idx]
            length = formats.bucket_length(max(len(r) for r in rows), buckets)
            ids, valid, mask = formats.pad_batch(rows, length, self.tokenizer.pad_id)
            kw = dict(mode=self.embed_mode, pooling=self.pooling_method, normalize=self.normalized)
            with self._scope():
                if get_cache:
                    reps, kv = embed_with_cache(self.params, self.config, ids, valid, mask, **kw)
                else:
                    reps = embed(self.params, self.config, ids, valid, mask, **kw)
            out[idx] = np.asarray(reps)
            if get_cache:
                k, v = np.asarray(kv.k), np.asarray(kv.v)
                for j, i in enumerate(idx):
                    n = len(rows[j])
                    caches[i] = PrefixCache(rows[j].ids, k[:, j, :n], v[:, j, :n])
        return (out, caches) if get_cache else out

    def encode_queries(self, queries, **kw) -> np.ndarray:
        """Encode retrieval queries (pass ``instruction=``)."""
        return self.encode(queries, **kw)

    def encode_corpus(self, corpus, **kw) -> np.ndarray:
        """Encode documents: strings or dicts with ``text`` and optional ``title``."""
        if isinstance(corpus, dict):
            corpus = [corpus]
        return self.encode([document_text(d) for d in corpus], **kw)

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------
    def generate(self, prompts, *, max_new_tokens: int = 64, sampling: Sampling = Sampling(),
                 seed: int = 0, batch_size: int = 16) -> str | list[str]:
        """Replies: one prompt (a string or a chat as a list of role dicts) or a list of prompts;
        greedy by default (``sampling=Sampling(greedy=False, temperature=0.7, top_p=0.9)``)."""
        single = isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], dict))
        prompts = [prompts] if single else list(prompts)
        if not prompts:
            raise ValueError("generate: no prompts given")
        for i, p in enumerate(prompts):
            if isinstance(p, str) and not p.strip():
                raise ValueError(f"prompt {i} is empty")
        encoded = [formats.encode_chat(self.tokenizer, p, add_generation_prompt=True).ids
                   for p in prompts]
        out = self.generate_tokens(encoded, max_new_tokens=max_new_tokens, sampling=sampling,
                                   seed=seed, batch_size=batch_size)
        replies = [self.tokenizer.decode(t) for t in out]
        return replies[0] if single else replies

    def generate_tokens(self, prompts: Sequence[Sequence[int]], *,
                        prefixes: Sequence[PrefixCache] | None = None, max_new_tokens: int = 64,
                        sampling: Sampling = Sampling(), seed: int = 0, batch_size: int = 16,
                        stop_at_eos: bool = True) -> list[list[int]]:
        """New token ids (EOS removed) for token-id prompts; each may continue a cached prefix.

        With ``prefixes``, prompt i is read after prefix i's key/value states (its positions
        follow the prefix), exactly as if prefix ids + prompt ids were one prompt whose prefix
        part had been computed by the pass that made the cache. Rows are bucketed by length,
        so each (prefix, prompt) bucket pair compiles once. ``stop_at_eos=False`` always
        generates ``max_new_tokens`` (EOS included in the output; for latency measurements).
        """
        if prefixes is not None and len(prefixes) != len(prompts):
            raise ValueError(f"{len(prefixes)} prefixes for {len(prompts)} prompts")
        self._check_length("max_new_tokens", max_new_tokens)
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be a positive integer")
        for i, p in enumerate(prompts):
            if len(p) == 0 and (prefixes is None or len(prefixes[i]) == 0):
                raise ValueError(f"prompt {i} has no tokens")
        limit = self.config.max_position_embeddings
        buckets = formats.length_buckets(limit)
        # room for the reply in powers of two from 64: budgets of 1 and 48 share one program
        room = formats.bucket_length(max_new_tokens, formats.length_buckets(
            max(limit, NEW_TOKENS_ROOM), smallest=NEW_TOKENS_ROOM))
        sampling.check(self.config.vocab_size)
        eos = self.tokenizer.eos_id if (stop_at_eos and self.tokenizer.eos_id is not None) else -1
        plen = [0 if prefixes is None else len(prefixes[i]) for i in range(len(prompts))]
        # Batch rows of similar total length together; results go back in the input order.
        order = np.argsort([-(plen[i] + len(p)) for i, p in enumerate(prompts)], kind="stable")
        results: list[list[int]] = [[] for _ in prompts]
        rng = jax.random.PRNGKey(seed)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            rows = [formats.Encoded(np.asarray(prompts[i], np.int32),
                                    np.ones(len(prompts[i]), np.int32)) for i in idx]
            length = formats.bucket_length(max(max(len(r) for r in rows), 1), buckets)
            prefix = None
            cached = 0
            if prefixes is not None:
                cached = formats.bucket_length(max(max(plen[i] for i in idx), 1), buckets)
                for i in idx:
                    prefixes[i].check_model(self.config)
                prefix = to_kv_cache([prefixes[i] for i in idx], cached, self.config.jnp_dtype)
            total = cached + length + room
            if max(plen[i] + len(prompts[i]) for i in idx) + max_new_tokens > limit:
                raise ValueError(f"cached prefix + prompt + max_new_tokens={max_new_tokens} "
                                 f"exceeds max_position_embeddings={limit}")
            ids, valid, _ = formats.pad_batch(rows, length, self.tokenizer.pad_id)
            rng, key = jax.random.split(rng)
            with self._scope():
                out, n = generate_ids(self._decode_params(), self.config, ids, valid, key,
                                      max_new_tokens=room, stop_after=max_new_tokens,
                                      sampling=sampling, eos_id=eos, cache_size=total,
                                      prefix=prefix)
            out, n = np.asarray(out), np.asarray(n)
            for j, i in enumerate(idx):
                results[i] = [int(t) for t in out[j, :n[j]] if t != eos]
        return results


def document_text(doc) -> str:
    """A corpus entry as text: a string, or ``title + " " + text`` of a dict (title optional)."""
    if isinstance(doc, dict):
        return doc["title"] + " " + doc["text"] if doc.get("title") else doc["text"]
    return doc
