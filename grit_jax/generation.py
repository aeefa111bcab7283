"""Autoregressive generation with a static-size KV cache: one jitted prefill + decode loop."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from grit_jax.config import ModelConfig
from grit_jax.model import KVCache, forward, is_per_layer, logits_fn


class Sampling(NamedTuple):
    """Decoding settings; ``greedy`` ignores the others."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0

    def check(self, vocab_size: int) -> None:
        """Refuse settings that cannot be meant (checked even when greedy ignores them)."""
        problems = []
        if not (isinstance(self.temperature, (int, float)) and 0 < self.temperature < float("inf")):
            problems.append(f"temperature={self.temperature!r} must be > 0 (use greedy=True for "
                            f"the most likely token)")
        if not (isinstance(self.top_k, int) and 0 <= self.top_k <= vocab_size):
            problems.append(f"top_k={self.top_k!r} must be an integer in [0, {vocab_size}] "
                            f"(0: no top-k filter)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            problems.append(f"top_p={self.top_p!r} must be in (0, 1]")
        if problems:
            raise ValueError("; ".join(problems))


def sample_logits(logits, rng, s: Sampling):
    """Next tokens (B,) from float32 logits (B, V) by greedy, temperature, top-k and top-p."""
    if s.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / max(s.temperature, 1e-6)
    if s.top_k:
        kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if s.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        keep = (jnp.cumsum(probs, axis=-1) - probs) < s.top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def prefill(params, config: ModelConfig, ids, valid, cache: KVCache, mode: str = "causal"):
    """Run the prompt (B, T) into the cache; returns logits (B, V) of each row's last token."""
    out = forward(params, config, ids, valid, mode=mode, cache=cache)
    last = jnp.maximum(valid.sum(-1) - 1, 0)
    h_last = jnp.take_along_axis(out.hidden, last[:, None, None], axis=1)
    return logits_fn(params, config, h_last)[:, 0], out.cache


def decode_step(params, config: ModelConfig, tokens, cache: KVCache):
    """One causal step for tokens (B,): logits (B, V) and the advanced cache."""
    out = forward(params, config, tokens[:, None], None, mode="causal", cache=cache)
    return logits_fn(params, config, out.hidden)[:, 0], out.cache


def extend_cache(prefix: KVCache, extra: int) -> KVCache:
    """The prefix cache with ``extra`` free slots appended (room for the prompt and the reply)."""
    pad = ((0, 0), (0, 0), (0, extra), (0, 0), (0, 0))
    return KVCache(jnp.pad(prefix.k, pad), jnp.pad(prefix.v, pad), prefix.lengths)


@partial(jax.jit, static_argnames=("config", "max_new_tokens", "sampling", "cache_size"))
def generate_ids(params, config: ModelConfig, ids, valid, rng, *, max_new_tokens: int,
                 sampling: Sampling = Sampling(), eos_id: int = -1, cache_size: int | None = None,
                 prefix: KVCache | None = None, stop_after=None):
    """New tokens (B, max_new_tokens) for right-padded prompts; after EOS a row emits eos_id.

    ``stop_after`` (traced, default ``max_new_tokens``): generate at most that many; the rest
    of the row is eos_id. One program then serves every budget up to ``max_new_tokens`` (the
    output width and the cache's room), so a 1-token latency probe reuses a 48-token answer's.

    ``prefix``: key/value states already computed for each row (e.g. a document's embedding
    pass); the prompt continues after ``prefix.lengths[b]`` tokens, at those positions. Also
    returns the number of generated tokens per row (EOS included).
    """
    b, t = ids.shape
    if prefix is None:
        cache = KVCache.empty(config, b, cache_size or (t + max_new_tokens))
    else:
        cache = extend_cache(prefix, t + max_new_tokens)
    if is_per_layer(params):  # one buffer per layer, written in place by every step
        cache = cache.split()
    logits, cache = prefill(params, config, ids, valid, cache)
    rng, key = jax.random.split(rng)
    tok = sample_logits(logits, key, sampling)
    out = jnp.full((b, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(tok)
    done, n = tok == eos_id, jnp.ones((b,), jnp.int32)
    stop = max_new_tokens if stop_after is None else jnp.minimum(stop_after, max_new_tokens)

    def cond(carry):
        i, _, _, _, done, _, _ = carry
        return (i < stop) & ~jnp.all(done)

    def body(carry):
        i, tok, cache, out, done, n, rng = carry
        logits, cache = decode_step(params, config, tok, cache)
        rng, key = jax.random.split(rng)
        tok = jnp.where(done, eos_id, sample_logits(logits, key, sampling))
        out = out.at[:, i].set(tok)
        n = n + (~done).astype(jnp.int32)
        return i + 1, tok, cache, out, done | (tok == eos_id), n, rng

    carry = jax.lax.while_loop(cond, body, (1, tok, cache, out, done, n, rng))
    return carry[3], carry[5]
