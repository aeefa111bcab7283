"""The GRIT train step: L = L_rep + lambda_gen * L_gen in one XLA program, with optional GradCache.

Batches are the dicts of ``grit_jax.data.pipeline`` (``query_*``, ``passage_*``, ``gen_*``).
Embedding passes use the bidirectional (``bb``) or causal (``cc``) mode of the attn string;
the generative pass is causal, or PrefixLM (``gen_attention="prefix"``: bidirectional within
each prompt span), or reads a chat's cached document bidirectionally and the rest causally
(``gen_attention="context"``: the token layout of doc-cached RAG, whose document states come
from its bidirectional embedding pass). Either side may be accumulated over micro-batches with
the full batch's result (the embedding side through GradCache, which keeps every passage a
candidate).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from grit_jax import lora, moe, sharding
from grit_jax.config import ModelConfig
from grit_jax.embedding import embedding_attention, represent
from grit_jax.losses import (AGGREGATIONS, MODES, contrastive_loss, shard_chunks, token_ce,
                             unshard_chunks)
from grit_jax.model import abstract_params, forward
from grit_jax.pooling import POOLING_METHODS
from grit_jax.sharding import batch_sharding, batch_shards, data_groups, within_data_group

# prefix: bidirectional over the prompt tokens; context: over a chat's cached document only
GEN_ATTENTIONS = ("causal", "prefix", "context")
EMB_GRADS = ("both", "query", "passage")  # which side the contrastive loss back-propagates


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """How the two losses are computed and combined (hashable: a static jit argument)."""

    mode: str = "unified"
    attn: str = "bbcc"
    pooling: str = "mean"
    normalize: bool = True
    temperature: float = 0.02
    lambda_gen: float = 1.0
    gen_aggregation: str = "mixed"
    gen_sub_batch: int = 32
    # >0: GradCache, chunks of this many sequences (global: a multiple of data x fsdp x expert)
    grad_cache_chunk: int = 0
    split_emb: bool = False  # back-propagate queries and passages in two passes
    logits_chunk: int = 1024  # tokens per chunk of the LM head (bounds logits memory)
    gen_attention: str = "causal"  # "prefix": PrefixLM; "context": the doc-cached RAG layout
    emb_grad: str = "both"  # "query" / "passage": the other side's reps are constants
    gen_micro_batches: int = 1  # generative rows accumulated in this many passes (same result)
    emb_micro_batches: int = 1  # embedding rows in this many GradCache chunks (same result)

    def __post_init__(self):
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode={self.mode!r} (expected one of {MODES})")
        embedding_attention(self.attn)  # raises on a bad attn string
        if self.pooling not in POOLING_METHODS:
            problems.append(f"pooling={self.pooling!r} (expected one of {POOLING_METHODS})")
        if self.gen_aggregation not in AGGREGATIONS:
            problems.append(f"gen_aggregation={self.gen_aggregation!r} "
                            f"(expected one of {AGGREGATIONS})")
        if self.temperature <= 0:
            problems.append(f"temperature={self.temperature} must be > 0")
        if self.grad_cache_chunk < 0 or self.gen_sub_batch < 1 or self.logits_chunk < 1:
            problems.append("grad_cache_chunk must be >= 0, gen_sub_batch and logits_chunk >= 1")
        if self.gen_attention not in GEN_ATTENTIONS:
            problems.append(f"gen_attention={self.gen_attention!r} "
                            f"(expected one of {GEN_ATTENTIONS})")
        if self.emb_grad not in EMB_GRADS:
            problems.append(f"emb_grad={self.emb_grad!r} (expected one of {EMB_GRADS})")
        if self.gen_micro_batches < 1 or self.emb_micro_batches < 1:
            problems.append("gen_micro_batches and emb_micro_batches must be >= 1")
        elif self.emb_micro_batches > 1 and (self.grad_cache_chunk or self.split_emb):
            problems.append(f"emb_micro_batches={self.emb_micro_batches} chunks the embedding "
                            f"side itself; set it or grad_cache_chunk / split_emb, not both")
        if problems:
            raise ValueError("Invalid loss config: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------
def key(rng, *tags):
    """A dropout key for one pass (None: no dropout): rng folded with the pass's tags."""
    for t in tags:
        rng = None if rng is None else jax.random.fold_in(rng, t)
    return rng


def grad_of(f, params, *, value: bool = False, has_aux: bool = False):
    """(f(params) and) its gradient w.r.t. the trainable parameters only (``lora.partition``:
    with adapters the frozen base takes no gradient, so none is ever computed or stored)."""
    train, frozen = lora.partition(params)
    diff = jax.value_and_grad if value else jax.grad
    return diff(lambda t: f(lora.combine(t, frozen)), has_aux=has_aux)(train)


def zero_grads(params):
    """Zeros shaped like the gradients grad_of gives."""
    return jax.tree.map(jnp.zeros_like, lora.partition(params)[0])


def reps(params, config: ModelConfig, lc: LossConfig, ids, valid, pool_mask, rng=None):
    """Pooled (normalised) embeddings of a right-padded batch, float32."""
    hidden = forward(params, config, ids, valid, mode=embedding_attention(lc.attn),
                     dropout_rng=rng).hidden
    return represent(params, config, hidden, pool_mask * valid, lc.pooling, lc.normalize)


def gen_weights(batch, lc: LossConfig):
    """Per-token weights (B, T-1) with sum(weights * ce) = the ``gen_aggregation`` loss: the
    aggregation's normalisers (token counts per sample or sub-batch, batch size) are fixed by
    the batch alone, so the loss is a plain weighted sum over rows (which lets each data group
    take the gradient of its own rows, see per_group)."""
    m = (batch["gen_loss"][:, 1:] * batch["gen_valid"][:, 1:]).astype(jnp.float32)
    b = m.shape[0]
    if lc.gen_aggregation == "token":
        return m / b
    if lc.gen_aggregation == "sample":
        return m / jnp.maximum(m.sum(1, keepdims=True), 1.0) / b
    groups = jnp.arange(b) // lc.gen_sub_batch  # mixed: token mean per sub-batch, then mean
    n = -(-b // lc.gen_sub_batch)
    counts = jax.ops.segment_sum(m.sum(1), groups, num_segments=n)
    return m / jnp.maximum(counts, 1.0)[groups][:, None] / n


def gen_loss(params, config: ModelConfig, lc: LossConfig, batch, rng=None):
    """(The generative loss of batch['gen_*'] (causal or PrefixLM attention), metrics).

    For a mixture of experts the router's load-balancing loss over the generative tokens is
    added with ``config.router_aux_loss_coef``, as transformers' MixtralForCausalLM adds it to
    its LM loss; the metrics then hold it (``loss_aux``) and each expert's share of the
    assignments (``expert_frac_<i>``).
    """
    if lc.gen_attention != "causal":
        prompt = batch["gen_valid"].astype(bool)
        if lc.gen_attention == "prefix":  # the prompt: valid tokens outside the loss
            prompt = prompt & ~batch["gen_loss"].astype(bool)
        else:  # context: the cached document, read as RAG's doc cache reads it (its embedding pass)
            prompt = prompt & batch["gen_context"].astype(bool)
        out = forward(params, config, batch["gen_ids"], batch["gen_valid"], mode="prefix",
                      prompt=prompt, dropout_rng=rng)
    else:
        out = forward(params, config, batch["gen_ids"], batch["gen_valid"], mode="causal",
                      dropout_rng=rng)
    ce = token_ce(params, config, out.hidden, batch["gen_ids"], lc.logits_chunk)
    weights = batch["gen_weights"] if "gen_weights" in batch else gen_weights(batch, lc)
    lm = jnp.sum(ce * weights.astype(ce.dtype))
    metrics = {"loss_gen": lm}
    if out.router is None:
        return lm, metrics
    aux = moe.load_balancing_loss(out.router)
    metrics["loss_aux"] = aux
    for i, f in enumerate(moe.expert_fractions(out.router, config.num_experts_per_tok)):
        metrics[f"expert_frac_{i}"] = f
    return lm + config.router_aux_loss_coef * aux, metrics


def per_group(fn, rows, *, rowwise: bool = False):
    """fn over the mesh's data groups: the sum of fn(group's rows), or with ``rowwise`` the
    groups' row outputs joined back in batch order.

    Each data-parallel replica (a slice of a multislice pod, on the data axis across the data-
    centre network) computes fn on its own rows, vmapped over the groups with
    ``spmd_axis_name="data"``: nothing crosses the data axis inside, and gradients are summed
    once at the end, where letting XLA partition a chunked loop reduces every chunk's (and every
    layer's) gradient across the data axis. Outside a mesh with a data axis, fn(rows).
    """
    n = data_groups()
    if n == 1:
        return fn(rows)
    split = jax.tree.map(lambda a: a.reshape((n, a.shape[0] // n) + a.shape[1:]), rows)

    def one(group_rows):
        with within_data_group():  # the batch of a group splits over fsdp x expert
            return fn(group_rows)

    out = jax.vmap(one, spmd_axis_name="data")(split)
    join = (lambda a: a.reshape((-1,) + a.shape[2:])) if rowwise else (lambda a: a.sum(0))
    return jax.tree.map(join, out)


def _q(batch):
    return batch["query_ids"], batch["query_valid"], batch["query_pool"]


def _p(batch):
    return batch["passage_ids"], batch["passage_valid"], batch["passage_pool"]


def one_sided(q, p, lc: LossConfig):
    """The reps with the side ``emb_grad`` leaves out held constant (no gradient through it)."""
    if lc.emb_grad == "query":
        return q, jax.lax.stop_gradient(p)
    if lc.emb_grad == "passage":
        return jax.lax.stop_gradient(q), p
    return q, p


def accumulate(fn, rows: dict, micro_batches: int):
    """The sum of fn(rows_i, i) over ``micro_batches`` shard-aligned slices of rows, one at a
    time (a scan: one micro-batch's activations live at once); fn(rows, 0) for one."""
    if micro_batches == 1:
        return fn(rows, 0)
    n = next(iter(rows.values())).shape[0]
    names = sorted(rows)
    xs = dict(zip(names, _chunks([rows[k] for k in names], n // micro_batches)))
    first = jax.tree.map(lambda a: a[0], xs)
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(fn, first, 0))

    def body(acc, micro):
        rows_i, i = micro
        return jax.tree.map(jnp.add, acc, fn(rows_i, i)), None

    return jax.lax.scan(body, zeros, (xs, jnp.arange(micro_batches)))[0]


def rep_loss(params, config, lc, batch, rng=None):
    """The contrastive loss of the batch (all passages of the global batch are candidates)."""
    q, p = one_sided(reps(params, config, lc, *_q(batch), key(rng, 1)),
                     reps(params, config, lc, *_p(batch), key(rng, 2)), lc)
    return contrastive_loss(q, p, lc.temperature)


def _chunks(arrays, size):
    """(N, ...) arrays -> (N/size, size, ...) for lax.map / scan, shard-aligned (shard_chunks)."""
    n, shards = arrays[0].shape[0], batch_shards()
    if not size or n % size:
        raise ValueError(f"a chunk of {size} sequences (grad_cache_chunk, or the rows over "
                         f"*_micro_batches) must divide the batch ({n} sequences)")
    if size % shards:
        raise ValueError(f"a chunk of {size} sequences (grad_cache_chunk, or the rows over "
                         f"*_micro_batches) must be a multiple of the batch shards ({shards} = "
                         f"mesh data x fsdp x expert): each chunk is split over them")
    return tuple(shard_chunks(a, n // size, shards) for a in arrays)


def rep_loss_and_grad_cached(params, config, lc, batch, rng=None):
    """GradCache: (L_rep, dL_rep/dparams) with memory bounded by one chunk of sequences.

    1. reps of every chunk without gradients; 2. L_rep and its gradient w.r.t. the reps;
    3. per chunk, the gradient of sum(reps(chunk) * rep_grad(chunk)), accumulated. Chunks hold
    ``grad_cache_chunk`` sequences, or each side's rows / ``emb_micro_batches``. A chunk's
    dropout key (its side and index) is the same in steps 1 and 3.
    """
    f = partial(reps, params, config, lc)
    grouped = not config.is_moe  # the experts' shard_map splits the batch itself
    groups = data_groups() if grouped else 1

    def size(arrays):
        return lc.grad_cache_chunk or arrays[0].shape[0] // lc.emb_micro_batches

    def all_reps(arrays, side):
        per = size(arrays) // groups

        def chunked(rows):
            xs = _chunks(rows, per)
            out = jax.lax.map(lambda a: jax.lax.stop_gradient(f(*a[0], key(rng, side, a[1]))),
                              (xs, jnp.arange(xs[0].shape[0])))
            return unshard_chunks(out, batch_shards())
        return per_group(chunked, tuple(arrays), rowwise=True) if grouped else chunked(arrays)

    q, p = all_reps(_q(batch), 1), all_reps(_p(batch), 2)
    loss, (gq, gp) = jax.value_and_grad(contrastive_loss, argnums=(0, 1))(q, p, lc.temperature)

    def backward(arrays, rep_grad, side):
        per = size(arrays) // groups

        def chunk_grads(rows):
            def body(acc, xs):
                (*a, g), i = xs
                k = key(rng, side, i)
                grads = grad_of(lambda prm: jnp.sum(reps(prm, config, lc, *a, k) * g), params)
                return jax.tree.map(jnp.add, acc, grads), None

            xs = _chunks(rows, per)
            acc, _ = jax.lax.scan(body, zero_grads(params), (xs, jnp.arange(xs[0].shape[0])))
            return acc

        rows = tuple(arrays) + (rep_grad,)
        return per_group(chunk_grads, rows) if grouped else chunk_grads(rows)

    sides = {"both": ((_q, gq, 1), (_p, gp, 2)), "query": ((_q, gq, 1),),
             "passage": ((_p, gp, 2),)}
    grads = [backward(rows(batch), g, side) for rows, g, side in sides[lc.emb_grad]]
    return loss, jax.tree.map(lambda *g: sum(g), *grads)


def rep_loss_and_grad_split(params, config, lc, batch, rng=None):
    """split_emb: the query side and the passage side back-propagated in two passes."""
    kq, kp = key(rng, 1), key(rng, 2)
    q_fixed = jax.lax.stop_gradient(reps(params, config, lc, *_q(batch), kq))
    p_fixed = jax.lax.stop_gradient(reps(params, config, lc, *_p(batch), kp))
    loss = contrastive_loss(q_fixed, p_fixed, lc.temperature)
    gq = gp = zero_grads(params)
    if lc.emb_grad != "passage":
        gq = grad_of(lambda prm: contrastive_loss(reps(prm, config, lc, *_q(batch), kq), p_fixed,
                                                  lc.temperature), params)
    if lc.emb_grad != "query":
        gp = grad_of(lambda prm: contrastive_loss(q_fixed, reps(prm, config, lc, *_p(batch), kp),
                                                  lc.temperature), params)
    return loss, jax.tree.map(jnp.add, gq, gp)


def loss_and_grads(params, config: ModelConfig, lc: LossConfig, batch, rng=None):
    """(metrics with loss, loss_rep, loss_gen (+ loss_aux, expert_frac_<i> for a mixture of
    experts); gradients of the total w.r.t. the trainable parameters: all of them, or with LoRA
    the adapters and an embedding head) for one batch. ``rng``: LoRA dropout's key (None: off)."""
    zeros = zero_grads(params)
    loss_rep, g_rep = jnp.float32(0.0), zeros
    loss_gen, g_gen = jnp.float32(0.0), zeros
    gen_metrics = {"loss_gen": loss_gen}
    if lc.mode != "embedding":  # generative first, as the reference does
        rows = {k: v for k, v in batch.items() if k.startswith("gen_")}
        rows["gen_weights"] = gen_weights(batch, lc)
        def grad_fn(rows, i=0):
            return grad_of(lambda p: gen_loss(p, config, lc, rows, key(rng, 0, i)), params,
                           value=True, has_aux=True)

        if config.is_moe:  # the balancing loss couples all rows: no per-group gradients
            if lc.gen_micro_batches > 1:
                raise ValueError("gen_micro_batches > 1 with a mixture of experts: the load-"
                                 "balancing loss couples all rows of the batch")
            (loss_gen, gen_metrics), g_gen = grad_fn(rows)
        else:
            (loss_gen, gen_metrics), g_gen = per_group(
                lambda r: accumulate(grad_fn, r, lc.gen_micro_batches), rows)
    if lc.mode != "generative":
        if lc.grad_cache_chunk or lc.emb_micro_batches > 1:
            loss_rep, g_rep = rep_loss_and_grad_cached(params, config, lc, batch, rng)
        elif lc.split_emb:
            loss_rep, g_rep = rep_loss_and_grad_split(params, config, lc, batch, rng)
        else:
            loss_rep, g_rep = grad_of(lambda p: rep_loss(p, config, lc, batch, rng), params,
                                      value=True)
    grads = jax.tree.map(lambda a, b: a + lc.lambda_gen * b, g_rep, g_gen)
    loss = loss_rep + lc.lambda_gen * loss_gen
    return {"loss": loss, "loss_rep": loss_rep, **gen_metrics}, grads


# ----------------------------------------------------------------------------------------------
# Optimiser and the step
# ----------------------------------------------------------------------------------------------
def make_optimizer(lr: float, total_steps: int, warmup_ratio: float = 0.03,
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, clip_norm: float = 1.0):
    """AdamW after global-norm clipping; linear warmup to lr, then linear decay to 0."""
    warmup = int(round(warmup_ratio * total_steps))
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup, 1)),
         optax.linear_schedule(lr, 0.0, max(total_steps - warmup, 1))], [warmup])
    tx = optax.chain(optax.clip_by_global_norm(clip_norm),
                     optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return tx, schedule


def train_step(state, batch, *, config: ModelConfig, lc: LossConfig, tx, schedule):
    """One update: state = {"step", "params", "opt_state"} -> (new state, metrics). With LoRA
    only the trainable parameters (lora.partition) are updated and have optimizer state.
    LoRA dropout's key is the step's (the same on every process, and on resume)."""
    rng = jax.random.fold_in(jax.random.PRNGKey(0), state["step"]) if config.lora_dropout else None
    metrics, grads = loss_and_grads(state["params"], config, lc, batch, rng)
    train, frozen = lora.partition(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], train)
    params = lora.combine(optax.apply_updates(train, updates), frozen)
    metrics.update(grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]))
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


# ----------------------------------------------------------------------------------------------
# Sharding: the step as one pjit-partitioned program
# ----------------------------------------------------------------------------------------------
def init_state(params, tx):
    """The train state for params (optimizer state for the trainable ones: lora.partition)."""
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": tx.init(lora.partition(params)[0])}


def state_shardings(config: ModelConfig, tx, mesh, rules=None):
    """NamedShardings of the whole train state (optimizer moments follow their parameters)."""
    rules = rules or sharding.LOGICAL_RULES
    boxed = abstract_params(config)
    sharding.check_divisible(boxed, mesh, rules)
    boxed_state = jax.eval_shape(lambda p: init_state(p, tx), boxed)
    specs = nn.get_partition_spec(boxed_state)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def jit_train_step(config: ModelConfig, lc: LossConfig, tx, schedule, mesh, state_sh):
    """``jax.jit`` of train_step with explicit in/out shardings and the state donated.

    Call it (and lower it) inside ``sharding.activate(mesh)``: the mesh and the logical axis
    rules must be in scope whenever a new batch shape is traced."""
    step = partial(train_step, config=config, lc=lc, tx=tx, schedule=schedule)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(step, in_shardings=(state_sh, batch_sharding(mesh)),
                   out_shardings=(state_sh, replicated), donate_argnums=(0,))
