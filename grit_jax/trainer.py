"""What a training run is made of, from its config: mesh, model and loss configs, optimizer,
validation, and the train state, created or restored straight into its shardings.

Shared by ``python -m grit_jax.train`` (which runs it) and ``python -m grit_jax.aot`` (which
compiles it for a TPU topology without running it).
"""

from __future__ import annotations

import math
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from grit_jax import attention, sharding, weights
from grit_jax.config import ModelConfig
from grit_jax.embedding import embedding_attention
from grit_jax.model import Transformer, param_shapes
from grit_jax.moe import resolve_impl
from grit_jax.train_step import LossConfig, init_state, make_optimizer, state_shardings

# Fields of config.model that say how the model runs, not what it is: with init_from (or a
# resumed workdir) they still come from the run's config.
EXECUTION_FIELDS = ("dtype", "param_dtype", "remat_policy", "attention_impl", "scan_unroll",
                    "moe_impl")


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
def model_config(config) -> ModelConfig:
    """The model: init_from's stored config (its weights are not read here) with the run's
    execution fields, or ``config.model`` for a random init."""
    if config.init_from:
        stored = weights.read_config(config.init_from)
        model = stored.replace(**{k: config.model[k] for k in EXECUTION_FIELDS
                                  if k in config.model})
        return model.replace(**added_parts(config, stored))
    return ModelConfig(**config.model.to_dict())


# Parts a run may add to init_from's model (fresh parameters: weights.load_params), with the
# fields that describe each.
ADDABLE = {"projection_dim": ("projection_dim",),
           "lora_rank": ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")}


def added_parts(config, stored: ModelConfig) -> dict:
    """The fields of config.model that add an embedding head or LoRA adapters to init_from's
    model (0 keeps what it has); changing a part it already has is refused."""
    out = {}
    for size, fields in ADDABLE.items():
        want = config.model.get(size, 0)
        if not want or want == getattr(stored, size):
            if size == "lora_rank" and stored.lora_rank and "lora_dropout" in config.model:
                out["lora_dropout"] = config.model.lora_dropout  # a training knob only
            continue
        if getattr(stored, size):
            raise ValueError(f"model.{size}={want}: {config.init_from} already has "
                             f"{size}={getattr(stored, size)} (set 0 to keep it)")
        out.update({f: config.model[f] for f in fields if f in config.model})
    if config.model.get("base_quant", "none") != "none":  # int8 storage of a float base
        out["base_quant"] = config.model.base_quant
    return out


def loss_config(config) -> LossConfig:
    return LossConfig(**config.loss.to_dict())


def optimizer(config):
    """(optax transformation, learning-rate schedule) from config.optim and total_steps."""
    o = config.optim
    return make_optimizer(o.lr, config.total_steps, o.warmup_ratio, o.weight_decay, o.b1, o.b2,
                          clip_norm=o.clip_norm)


def mesh(config, devices=None):
    """The device mesh: ``config.mesh`` inside each slice, ``config.dcn_mesh`` across slices."""
    dcn = config.get("dcn_mesh")
    return sharding.make_mesh(config.mesh.to_dict(), devices=devices,
                              dcn_shape=None if dcn is None else dcn.to_dict())


def validate(config, mesh_, model_cfg: ModelConfig) -> None:
    """Fail before compiling on configs that cannot work, naming the field."""
    problems = []
    platform = mesh_.devices.flat[0].platform
    if model_cfg.is_moe:
        try:
            resolve_impl(model_cfg.moe_impl, platform)
        except ValueError as e:
            problems.append(f"model.{e}")
    try:
        attention.check_platform(model_cfg.attention_impl, platform)
    except ValueError as e:
        problems.append(f"model.{e}")
    if model_cfg.num_experts and model_cfg.num_experts % mesh_.shape["expert"]:
        problems.append(f"model.num_experts={model_cfg.num_experts} is not divisible by "
                        f"mesh.expert={mesh_.shape['expert']} (each device holds whole experts)")
    for name in ("total_steps", "checkpoint_every", "log_every", "keep_checkpoints"):
        if int(config[name]) <= 0:
            problems.append(f"{name}={config[name]} must be > 0")
    if float(config.get("checkpoint_every_minutes", 0) or 0) < 0:
        problems.append(f"checkpoint_every_minutes={config.checkpoint_every_minutes} must be >= 0")
    dp = sharding.batch_shards(mesh_)
    for name in ("query_batch", "generative_batch", "group_size"):
        if int(config.data[name]) <= 0:
            problems.append(f"data.{name}={config.data[name]} must be > 0")
        elif name != "group_size" and int(config.data[name]) % dp:
            problems.append(f"data.{name}={config.data[name]} is not divisible by the "
                            f"data-parallel size {dp} (mesh data x fsdp x expert, slices included)")
    chunk = int(config.loss.get("grad_cache_chunk", 0))
    if chunk > 0 and config.loss.mode != "generative":
        passages = int(config.data.query_batch) * int(config.data.group_size)
        if chunk % dp:
            problems.append(f"loss.grad_cache_chunk={chunk} is not a multiple of the data-parallel "
                            f"size {dp} (mesh data x fsdp x expert): each chunk is split over the "
                            f"devices")
        elif int(config.data.query_batch) % chunk or passages % chunk:
            problems.append(f"loss.grad_cache_chunk={chunk} must divide data.query_batch="
                            f"{config.data.query_batch} and the passages per step ({passages})")
    for side, batch in (("gen", "generative_batch"), ("emb", "query_batch")):
        k = int(config.loss.get(f"{side}_micro_batches", 1))
        rows = int(config.data[batch])
        if k > 1 and rows > 0 and rows % (k * dp):
            problems.append(f"loss.{side}_micro_batches={k} must split data.{batch}={rows} into "
                            f"micro-batches that are multiples of the data-parallel size {dp}")
    if model_cfg.is_moe and int(config.loss.get("gen_micro_batches", 1)) > 1:
        problems.append("loss.gen_micro_batches > 1 with a mixture of experts: the load-balancing "
                        "loss couples all rows of the batch")
    o = config.optim
    ranges = {"lr": (0, math.inf, False), "warmup_ratio": (0, 1, True),
              "weight_decay": (0, math.inf, True), "b1": (0, 1, True), "b2": (0, 1, True),
              "clip_norm": (0, math.inf, False)}
    for name, (lo, hi, lo_ok) in ranges.items():
        v = float(o[name])
        if not (math.isfinite(v) and (lo <= v if lo_ok else lo < v) and v < hi):
            problems.append(f"optim.{name}={o[name]} must be in {'[' if lo_ok else '('}{lo}, "
                            f"{hi}) (e.g. the GritLM recipe: lr 2e-5, warmup_ratio 0.03, "
                            f"b1 0.9, b2 0.999, clip_norm 1.0)")
    if problems:
        raise ValueError("Invalid config: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------
# The train state, sharded from the first byte
# ----------------------------------------------------------------------------------------------
def abstract_state(model_cfg: ModelConfig, tx, state_sh):
    """ShapeDtypeStructs (with shardings) of the train state: what restore and AOT target."""
    shapes = jax.eval_shape(lambda p: init_state(p, tx), param_shapes(model_cfg))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, state_sh)


def _random_state(key, model_cfg: ModelConfig, tx):
    model = Transformer(model_cfg)
    tokens = jnp.zeros((1, 4), jnp.int32)
    params = nn.unbox(model.init(key, tokens, method=Transformer.init_all)["params"])
    return init_state(params, tx)


def init_program(model_cfg: ModelConfig, tx, mesh_, state_sh):
    """The jitted random init: every device computes only its own shards of the parameters and
    optimizer state (partitionable threefry: the same numbers as an unsharded init)."""
    replicated = jax.sharding.NamedSharding(mesh_, jax.sharding.PartitionSpec())
    return jax.jit(partial(_random_state, model_cfg=model_cfg, tx=tx),
                   in_shardings=replicated, out_shardings=state_sh)


def random_state(model_cfg: ModelConfig, tx, mesh_, state_sh, seed: int):
    """A fresh train state, created sharded on the mesh."""
    with sharding.activate(mesh_):
        return init_program(model_cfg, tx, mesh_, state_sh)(jax.random.PRNGKey(seed))


def state_from_params(params, tx, mesh_, state_sh):
    """A train state around already sharded params: the optimizer state is made in place."""
    with sharding.activate(mesh_):
        return jax.jit(lambda p: init_state(p, tx), in_shardings=(state_sh["params"],),
                       out_shardings=state_sh, donate_argnums=(0,))(params)


def shardings(model_cfg: ModelConfig, tx, mesh_):
    """NamedShardings of the train state (divisibility checked first)."""
    return state_shardings(model_cfg, tx, mesh_)


# ----------------------------------------------------------------------------------------------
# Accounting
# ----------------------------------------------------------------------------------------------
def step_flops(model_cfg: ModelConfig, batch, lc: LossConfig | None = None) -> float:
    """Model FLOPs of one batch (forward + backward, no recompute): see
    ModelConfig.training_flops. Embedding passes attend as the attn string says; the
    generative pass is causal and pays for the LM head."""
    emb_causal = lc is not None and embedding_attention(lc.attn) == "causal"
    total = 0.0
    for prefix in ("query", "passage", "gen"):
        if f"{prefix}_valid" not in batch:
            continue
        lengths = np.asarray(batch[f"{prefix}_valid"]).sum(-1)
        gen = prefix == "gen"
        total += sum(model_cfg.training_flops(int(n), causal=gen or emb_causal, lm_head=gen)
                     for n in lengths)
    return total
