"""``python -m grit_jax.train --config configs/tiny.py --workdir DIR``: GRIT training.

One jitted, mesh-partitioned step (contrastive + LM loss), Orbax checkpoints of the train state
and the data iterator (resume in the same workdir), ``DIR/metrics.jsonl``, a NaN guard and a
save on SIGTERM (preemption).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "training config file (get_config())",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, metrics and (for the demo) data go here")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "JAX multi-controller runtime: auto = on a TPU VM, or when "
                  "--coordinator_address is given")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (off TPU VMs)")
flags.DEFINE_integer("num_processes", None, "number of processes (with --coordinator_address)")
flags.DEFINE_integer("process_id", None, "this process's index (with --coordinator_address)")
flags.DEFINE_integer("heartbeat_timeout", 100,
                     "seconds after which a silent process is declared dead and the others stop")

TPU_DEVICE_FILES = ("/dev/accel0", "/dev/vfio/0")


def initialize_distributed(mode: str = "auto", coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           heartbeat_timeout: int = 100) -> bool:
    """Start jax.distributed when this run spans several processes; True if started.

    On a TPU VM the coordinator, process count and index come from the TPU environment; elsewhere
    from the arguments (CPU processes then use gloo for cross-process collectives).
    """
    explicit = coordinator_address is not None
    on_tpu_vm = any(os.path.exists(f) for f in TPU_DEVICE_FILES)
    if mode == "off" or (mode == "auto" and not explicit and not on_tpu_vm):
        return False
    if explicit:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} must be in [0, {num_processes})")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   heartbeat_timeout_seconds=heartbeat_timeout)
    else:
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout)
    return True


class NonFiniteLoss(RuntimeError):
    """A NaN/inf loss: the run stops and that state is not checkpointed."""


def validate(config, mesh) -> None:
    """Fail before compiling on configs that cannot work, naming the field."""
    from grit_jax import sharding

    problems = []
    if config.model.get("family") == "mixtral":
        from grit_jax.moe import resolve_impl

        try:
            resolve_impl(config.model.get("moe_impl", "auto"), mesh.devices.flat[0].platform)
        except ValueError as e:
            problems.append(f"model.{e}")
    experts = int(config.model.get("num_experts", 0) or 0)
    if experts and experts % mesh.shape["expert"]:
        problems.append(f"model.num_experts={experts} is not divisible by mesh.expert="
                        f"{mesh.shape['expert']} (each device holds whole experts)")
    for name in ("total_steps", "checkpoint_every", "log_every", "keep_checkpoints"):
        if int(config[name]) <= 0:
            problems.append(f"{name}={config[name]} must be > 0")
    dp = sharding.batch_shards(mesh)
    for name in ("query_batch", "generative_batch", "group_size"):
        if int(config.data[name]) <= 0:
            problems.append(f"data.{name}={config.data[name]} must be > 0")
        elif name != "group_size" and int(config.data[name]) % dp:
            problems.append(f"data.{name}={config.data[name]} is not divisible by the "
                            f"data-parallel size {dp} (mesh data x fsdp x expert)")
    chunk = int(config.loss.get("grad_cache_chunk", 0))
    if chunk > 0 and config.loss.mode != "generative":
        passages = int(config.data.query_batch) * int(config.data.group_size)
        if chunk % dp:
            problems.append(f"loss.grad_cache_chunk={chunk} is not a multiple of the data-parallel "
                            f"size {dp} (mesh data x fsdp): each chunk is split over the devices")
        elif int(config.data.query_batch) % chunk or passages % chunk:
            problems.append(f"loss.grad_cache_chunk={chunk} must divide data.query_batch="
                            f"{config.data.query_batch} and the passages per step ({passages})")
    if problems:
        raise ValueError("Invalid config: " + "; ".join(problems))


def _model(config):
    from grit_jax.config import ModelConfig
    from grit_jax.inference import load_model
    from grit_jax.model import init_params

    if config.init_from:
        params, model_cfg = load_model(config.init_from)
        overrides = {k: config.model[k] for k in ("dtype", "remat_policy") if k in config.model}
        return params, model_cfg.replace(**overrides)
    model_cfg = ModelConfig(**config.model.to_dict())
    return init_params(model_cfg, seed=config.seed), model_cfg


# bf16 dense peak per chip (vendor figures); MFU is reported against these.
PEAK_FLOPS = (("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5", 197e12), ("TPU v4", 275e12),
              ("H200", 989e12), ("H100", 989e12), ("A100", 312e12))


def peak_flops(config) -> float | None:
    """Peak FLOP/s of one device: ``config.peak_flops`` if set, else the table, else None (CPU)."""
    if config.get("peak_flops"):
        return float(config.peak_flops)
    kind = jax.devices()[0].device_kind
    return next((f for name, f in PEAK_FLOPS if name.lower() in kind.lower()), None)


def step_flops(model_cfg, batch) -> float:
    """Training FLOPs of one batch: 6 x matmul parameters x tokens (for a mixture of experts,
    the router and the k experts a token uses), the LM head on generative tokens only, and the
    attention scores (12 x layers x heads x head_dim x length^2)."""
    c = model_cfg
    e, d = c.hidden_size, c.resolved_head_dim
    body = c.num_layers * c.layer_matmul_params(active=True)
    total = 0.0
    for prefix in ("query", "passage", "gen"):
        if f"{prefix}_valid" not in batch:
            continue
        lengths = batch[f"{prefix}_valid"].sum(-1).astype(np.float64)
        total += 6 * body * lengths.sum() + 12 * c.num_layers * c.num_heads * d * (lengths ** 2).sum()
        if prefix == "gen":
            total += 6 * e * c.vocab_size * lengths.sum()
    return total


def _save_tokenizer(config, meta, workdir):
    """Ship the tokenizer the data was built with into the workdir (for export and inference)."""
    from grit_jax.data.dataset import tokenizer_fingerprint
    from grit_jax.data.tokenizers import default_tokenizer, load_tokenizer

    candidates = [default_tokenizer]
    if config.init_from:
        candidates.insert(0, lambda: load_tokenizer(config.init_from))
    for make in candidates:
        try:
            tok = make()
        except (FileNotFoundError, ValueError):
            continue
        if tokenizer_fingerprint(tok)["sha256"] == meta["tokenizer"]["sha256"]:
            tok.save(workdir)
            return
    logging.warning("the data's tokenizer (%s) was not found beside the model; pass --tokenizer "
                    "when exporting", meta["tokenizer"]["file"])


DEMO_LENGTHS = {"query": 64, "passage": 128, "generative": 128}


def resolve_data_dir(config, workdir):
    """config.data.data_dir, or for "demo" the Wikipedia set built under workdir on first use."""
    if config.data.data_dir != "demo":
        return config.data.data_dir
    from grit_jax.data import wiki_demo

    root = os.path.join(workdir, "data")
    if not os.path.isdir(os.path.join(root, "train")):
        wiki_demo.make_demo_data(root, max_lengths=DEMO_LENGTHS)
    return os.path.join(root, "train")


def train(config, workdir: str) -> list[dict]:
    """Train (or resume) in workdir; returns the logged metrics of this invocation."""
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils
    from tqdm import tqdm

    from grit_jax import sharding
    from grit_jax.data.pipeline import GritBatches, PipelineConfig, global_batch
    from grit_jax.train_step import (LossConfig, init_state, jit_train_step, make_optimizer,
                                     state_shardings)

    # ----------------------------------------------------------------------------------------
    # Config, mesh, model, data
    # ----------------------------------------------------------------------------------------
    mesh = sharding.make_mesh(config.mesh.to_dict())
    validate(config, mesh)
    os.makedirs(workdir, exist_ok=True)
    lc = LossConfig(**config.loss.to_dict())
    params, model_cfg = _model(config)
    tx, schedule = make_optimizer(config.optim.lr, config.total_steps,
                                  config.optim.warmup_ratio, config.optim.weight_decay,
                                  config.optim.b1, config.optim.b2, clip_norm=config.optim.clip_norm)
    state_sh = state_shardings(model_cfg, tx, mesh)
    data = GritBatches(PipelineConfig(
        resolve_data_dir(config, workdir), query_batch=config.data.query_batch,
        generative_batch=config.data.generative_batch, group_size=config.data.group_size,
        mode=lc.mode, seed=config.seed, num_threads=config.data.num_threads,
        num_epochs=config.total_steps))  # an upper bound: the dataset is indexed lazily
    if data.meta["tokenizer"]["vocab_size"] > model_cfg.vocab_size:
        raise ValueError(f"the data was tokenised with {data.meta['tokenizer']['vocab_size']} "
                         f"tokens, the model has vocab_size={model_cfg.vocab_size}")
    model_cfg.save(workdir)
    _save_tokenizer(config, data.meta, workdir)
    n_params = model_cfg.num_params()
    logging.info("mesh %s, %.1fM parameters, %s", dict(mesh.shape), n_params / 1e6, data.summary())
    print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.default_backend()} devices; "
          f"{n_params / 1e6:.1f}M parameters; {data.summary()}", flush=True)

    # ----------------------------------------------------------------------------------------
    # State: fresh or restored
    # ----------------------------------------------------------------------------------------
    manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        item_names=("state", "data"),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                             enable_async_checkpointing=True))
    iterator = data.iterator()
    latest = manager.latest_step()
    if latest is None:
        state = jax.device_put(init_state(params, tx), state_sh)
    else:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                jax.eval_shape(lambda p: init_state(p, tx), params), state_sh)
        restored = manager.restore(latest, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        state = restored["state"]
        iterator.set_state(restored["data"])
        print(f"resumed from step {latest}", flush=True)
    del params
    per_device = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(state))
    stats = jax.local_devices()[0].memory_stats() or {}
    print(f"train state: {per_device / 2**20:.1f} MiB per device"
          + (f"; device memory in use {stats['bytes_in_use'] / 2**30:.2f} of "
             f"{stats.get('bytes_limit', 0) / 2**30:.2f} GiB" if "bytes_in_use" in stats else ""),
          flush=True)
    peak = peak_flops(config)
    print(f"MFU against {peak / 1e12:.0f} TFLOP/s per device" if peak else
          f"MFU not reported: no peak FLOP/s known for {jax.devices()[0].device_kind} "
          f"(set --config.peak_flops)", flush=True)
    step_fn = jit_train_step(model_cfg, lc, tx, schedule, mesh, state_sh)
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(os.path.join(workdir, "tensorboard")) if jax.process_index() == 0 else None
    batch_sh = sharding.batch_sharding(mesh)

    def save(step):
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(iterator.get_state())))

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda s, f: stop.update(signal=s))

    # ----------------------------------------------------------------------------------------
    # Loop
    # ----------------------------------------------------------------------------------------
    start = int(jax.device_get(state["step"]))
    logged, t_last, tokens, flops = [], time.perf_counter(), 0, 0.0
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    lead = jax.process_index() == 0  # metrics, TensorBoard and progress come from process 0
    try:
        with open(metrics_path if lead else os.devnull, "a", encoding="utf-8") as mf:
            for step in tqdm(range(start, config.total_steps), initial=start,
                             total=config.total_steps, desc="train",
                             disable=None if lead else True):
                local = next(iterator)
                tokens += sum(int(v.sum()) for k, v in local.items() if k.endswith("_valid"))
                flops += step_flops(model_cfg, local)
                state, metrics = step_fn(state, global_batch(local, batch_sh, data.pad_id))
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                bad = [k for k in ("loss_rep", "loss_gen", "loss") if not np.isfinite(m[k])]
                if bad:
                    raise NonFiniteLoss(f"step {step + 1}: {', '.join(bad)} is {m[bad[0]]} "
                                        f"(not finite); stopping without checkpointing this state")
                done = step + 1
                if done % config.log_every == 0 or done == config.total_steps:
                    dt = time.perf_counter() - t_last
                    # Local tokens/FLOPs x processes: every process reads an equal share.
                    row = {"step": done, **m, "tokens_per_s": tokens * jax.process_count() / dt,
                           "mfu": (flops * jax.process_count() / dt / (peak * jax.device_count())
                                   if peak else None)}
                    mf.write(json.dumps(row) + "\n")
                    mf.flush()
                    if writer is not None:
                        for k, v in row.items():
                            if k != "step" and v is not None:
                                writer.add_scalar(f"train/{k}", v, done)
                        writer.flush()
                    logged.append(row)
                    if lead:
                        aux = f", router {m['loss_aux']:.3f}" if "loss_aux" in m else ""
                        tqdm.write(f"step {done}: loss {m['loss']:.4f} (rep {m['loss_rep']:.4f}, gen "
                                   f"{m['loss_gen']:.4f}{aux}) lr {m['lr']:.2e} grad_norm "
                                   f"{m['grad_norm']:.3f} {row['tokens_per_s']:.0f} tok/s")
                    t_last, tokens, flops = time.perf_counter(), 0, 0.0
                # A preempted host stops every host at the same step: they agree on the flag.
                stopping = bool(stop["signal"])
                if jax.process_count() > 1:
                    stopping = bool(np.asarray(multihost_utils.process_allgather(
                        np.int32(stopping))).any())
                if done % config.checkpoint_every == 0 or done == config.total_steps or stopping:
                    save(done)
                if stopping:
                    print(f"signal {stop['signal'] or 'on another process'}: saved step {done}, "
                          f"exiting", flush=True)
                    break
    finally:
        if writer is not None:
            writer.close()
        manager.wait_until_finished()
        manager.close()
        signal.signal(signal.SIGTERM, previous)
    return logged


def main(argv):
    del argv
    if FLAGS.workdir is None:
        raise app.UsageError("--workdir is required")
    if "://" in FLAGS.workdir:  # data (array_record), metrics and TensorBoard use local file I/O
        raise app.UsageError(
            f"--workdir={FLAGS.workdir}: object-store URLs are not supported; mount the bucket "
            f"(launch/tpu.py setup --mount-bucket BUCKET mounts gs://BUCKET at /gcs/BUCKET) and "
            f"pass the mounted path, e.g. --workdir=/gcs/BUCKET/run")
    try:
        initialize_distributed(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id, FLAGS.heartbeat_timeout)
        train(FLAGS.config, FLAGS.workdir)
    except (ValueError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
