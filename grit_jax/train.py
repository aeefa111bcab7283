"""``python -m grit_jax.train --config configs/tiny.py --workdir DIR``: GRIT training.

One jitted, mesh-partitioned step (contrastive + LM loss); the train state is created or
restored straight into its shardings; Orbax checkpoints of the state and the data iterator
(resume in the same workdir), ``metrics.jsonl`` and TensorBoard events. DIR may be local or a
``gs://`` bucket path (checkpoints are written there directly). Process 0 writes the shared
files, the others wait for it. A persistent compilation cache (``DIR/compile_cache`` by default)
makes restarts skip compilation. Checkpoints every ``checkpoint_every`` steps and every
``checkpoint_every_minutes``; a SIGTERM on any host (preemption) saves at once on every host and
stops them at the same step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags
from tqdm import tqdm

from grit_jax import checkpoint, cli, hardware, sharding, storage, trainer, weights
from grit_jax.config import CONFIG_FILE, ModelConfig
from grit_jax.data.dataset import tokenizer_fingerprint
from grit_jax.data.pipeline import GritBatches, PipelineConfig, global_batch, parse_buckets
from grit_jax.data.tokenizers import default_tokenizer, load_tokenizer
from grit_jax.train_step import jit_train_step

FLAGS = flags.FLAGS
if "config" not in FLAGS:  # grit_jax.aot defines the same flag
    config_flags.DEFINE_config_file("config", None, "training config file (get_config())",
                                    lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints and metrics go here; a local path or "
                    "gs://BUCKET/PATH")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "JAX multi-controller runtime: auto = on a TPU VM, or when "
                  "--coordinator_address is given")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (off TPU VMs)")
flags.DEFINE_integer("num_processes", None, "number of processes (with --coordinator_address)")
flags.DEFINE_integer("process_id", None, "this process's index (with --coordinator_address)")
flags.DEFINE_integer("heartbeat_timeout", 100,
                     "seconds after which a silent process is declared dead and the others stop")
flags.DEFINE_string("compilation_cache", "workdir",
                    "persistent compilation cache: 'workdir' (WORKDIR/compile_cache), 'off', or a "
                    "directory (local or gs://)")

METRICS_FILE = "metrics.jsonl"


def initialize_distributed(mode: str = "auto", coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           heartbeat_timeout: int = 100) -> bool:
    """Start jax.distributed when this run spans several processes; True if started.

    On a TPU VM the coordinator, process count and index come from the TPU environment; elsewhere
    from the arguments (CPU processes then use gloo for cross-process collectives).
    """
    explicit = coordinator_address is not None
    on_tpu_vm = hardware.on_tpu_vm()
    if mode == "off" or (mode == "auto" and not explicit and not on_tpu_vm):
        return False
    if explicit:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} must be in [0, {num_processes})")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if not on_tpu_vm:
            # The CPU runtime runs a program's independent operations concurrently, and its
            # concurrency-optimised scheduler lets two devices of one process reach independent
            # collectives in different orders: across processes (gloo) that deadlocks (seen with
            # a 3-layer float64 step on 2 x 4 devices). Read when the backend starts, i.e. next.
            flag = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
            if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
                os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   heartbeat_timeout_seconds=heartbeat_timeout)
    else:
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout)
    return True


class NonFiniteLoss(RuntimeError):
    """A NaN/inf loss: the run stops and that state is not checkpointed."""


def is_lead() -> bool:
    """Process 0 writes the shared files (config, tokenizer, metrics, TensorBoard)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all arrive (a no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------------------------
# Compilation cache
# ----------------------------------------------------------------------------------------------
class CacheCounter:
    """Counts persistent compilation cache hits and misses (jax.monitoring events)."""

    def __init__(self):
        self.hits = self.misses = 0
        jax.monitoring.register_event_listener(self._event)

    def _event(self, name, **_):
        if name == "/jax/compilation_cache/cache_hits":
            self.hits += 1
        elif name == "/jax/compilation_cache/cache_misses":
            self.misses += 1


def enable_compilation_cache(spec: str, workdir: str) -> str | None:
    """Turn on JAX's persistent compilation cache (``spec``: 'workdir', 'off' or a directory)."""
    if spec == "off":
        return None
    path = storage.join(workdir, "compile_cache") if spec == "workdir" else storage.normalize(spec)
    jax.config.update("jax_compilation_cache_dir", path)  # made by JAX at the first compile
    return path


# ----------------------------------------------------------------------------------------------
# The workdir: data, model config, tokenizer
# ----------------------------------------------------------------------------------------------
def require_data_dir(config) -> None:
    """Refuse a run without data before anything is compiled or written."""
    if not config.data.data_dir:
        raise ValueError("data.data_dir is not set: build a dataset (python -m grit_jax.data build"
                         " or python -m grit_jax.data adapt --build; the Wikipedia demo set: "
                         "python -m demo.wikipedia --out DIR) and pass "
                         "--config.data.data_dir=DIR/train")


def resolve_data_dir(config) -> str:
    """A local directory holding the built dataset: ``config.data.data_dir`` itself (a local
    path or a read-only bucket mount), or a ``gs://`` path copied once to this host's disk
    (array_record files are read locally)."""
    data_dir = config.data.data_dir
    require_data_dir(config)
    if storage.is_remote(data_dir):
        return fetch_data(data_dir)
    return data_dir


def fetch_data(url: str) -> str:
    """Copy a built dataset from object storage to this host's disk once; its local path."""
    cache = os.path.join(os.path.expanduser("~"), ".cache", "grit_jax", "data",
                         hashlib.sha1(url.encode()).hexdigest()[:16])
    if os.path.exists(os.path.join(cache, ".complete")):
        return cache
    if not storage.isdir(url):
        raise ValueError(f"data.data_dir={url}: no such directory in the bucket")
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging.", dir=os.path.dirname(cache))
    n = storage.copy_tree(url, staging)
    open(os.path.join(staging, ".complete"), "w").close()
    try:
        os.rename(staging, cache)  # another process on this host may have won the race
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"copied {n} data files from {url} to {cache}", flush=True)
    return cache


IDENTITY_IGNORED = set(trainer.EXECUTION_FIELDS)


def config_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """Fields (other than execution knobs) in which two model configs differ."""
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: {da[k]!r} vs {db[k]!r}" for k in sorted(da)
            if k not in IDENTITY_IGNORED and da[k] != db[k]]


def run_model_config(config, workdir: str, resuming: bool) -> ModelConfig:
    """The model of this run, checked against the workdir's before anything is written."""
    path = storage.join(workdir, CONFIG_FILE)
    stored = ModelConfig.load(workdir) if storage.exists(path) else None
    try:
        wanted = trainer.model_config(config)
    except FileNotFoundError:
        if not (resuming and stored is not None):  # a resumed run does not need init_from
            raise
        wanted = stored.replace(**{k: config.model[k] for k in trainer.EXECUTION_FIELDS
                                   if k in config.model})
    if stored is not None:
        diff = config_differences(stored, wanted)
        if diff:
            raise ValueError(f"{path}: this workdir holds a different model ({'; '.join(diff[:6])} "
                             f"(stored vs this run)); use a new --workdir, or the config it was "
                             f"trained with")
    return wanted


def write_workdir_files(config, workdir: str, model_cfg: ModelConfig, meta: dict) -> None:
    """Process 0 writes grit_config.json and the data's tokenizer if absent (never over
    earlier work); every process waits until they exist."""
    if is_lead():
        storage.makedirs(workdir)
        if not storage.exists(storage.join(workdir, CONFIG_FILE)):
            model_cfg.save(workdir)
        _save_tokenizer(config, meta, workdir)
    barrier("grit_jax workdir files")


def _save_tokenizer(config, meta, workdir):
    """Ship the tokenizer the data was built with into the workdir (for export and inference)."""
    if any(storage.exists(storage.join(workdir, f))
           for f in ("tokenizer.model", "tokenizer.json")):
        return
    candidates = [default_tokenizer]
    if config.init_from and not storage.is_remote(config.init_from):
        candidates.insert(0, lambda: load_tokenizer(weights.tokenizer_path(config.init_from)))
    for make in candidates:
        try:
            tok = make()
        except (FileNotFoundError, ValueError):
            continue
        if tokenizer_fingerprint(tok)["sha256"] == meta["tokenizer"]["sha256"]:
            with tempfile.TemporaryDirectory() as tmp:
                for f in tok.save(tmp):
                    storage.copy_file(f, storage.join(workdir, os.path.basename(f)))
            return
    logging.warning("the data's tokenizer (%s) was not found beside the model; pass --tokenizer "
                    "when exporting", meta["tokenizer"]["file"])


# ----------------------------------------------------------------------------------------------
# Metrics: metrics.jsonl, TensorBoard, the progress line (process 0)
# ----------------------------------------------------------------------------------------------
class MetricsWriter:
    """Rows to ``metrics.jsonl``, TensorBoard and the progress line; a no-op off process 0.
    Object stores have no append: there the file is rewritten whole, at most every
    ``sync_secs`` and at every flush(force=True)."""

    def __init__(self, workdir: str, enabled: bool, sync_secs: float = 30.0):
        self.enabled, self.path = enabled, storage.join(workdir, METRICS_FILE)
        self.remote, self.sync_secs = storage.is_remote(workdir), sync_secs
        self.lines: list[str] = []
        self._synced = time.monotonic()
        self._file = self._tb = None
        if not enabled:
            return
        if self.remote:
            if storage.exists(self.path):  # a resumed run continues the file
                self.lines = storage.read_text(self.path).splitlines(keepends=True)
        else:
            self._file = open(self.path, "a", encoding="utf-8")
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(storage.join(workdir, "tensorboard"),
                                 flush_secs=sync_secs if self.remote else 120)

    def progress(self, start: int, total: int):
        """The steps start..total-1 under a progress bar (process 0, on a terminal)."""
        return tqdm(range(start, total), initial=start, total=total, desc="train",
                    disable=None if self.enabled else True)

    def note(self, text: str | None) -> None:
        """A line above the progress bar (process 0)."""
        if self.enabled and text:
            tqdm.write(text)
            sys.stdout.flush()

    def write(self, row: dict) -> None:
        """One logged step: a metrics.jsonl line, TensorBoard scalars and the progress line."""
        if not self.enabled:
            return
        aux = f", router {row['loss_aux']:.3f}" if "loss_aux" in row else ""
        self.note(f"step {row['step']}: loss {row['loss']:.4f} (rep {row['loss_rep']:.4f}, gen "
                  f"{row['loss_gen']:.4f}{aux}) lr {row['lr']:.2e} grad_norm "
                  f"{row['grad_norm']:.3f} {row['tokens_per_s']:.0f} tok/s")
        line = json.dumps(row) + "\n"
        if self.remote:
            self.lines.append(line)
        else:
            self._file.write(line)
            self._file.flush()
        for k, v in row.items():
            if k != "step" and v is not None:
                self._tb.add_scalar(f"train/{k}", v, row["step"])
        self.flush()

    def flush(self, force: bool = False) -> None:
        if not self.enabled:
            return
        if not self.remote:
            self._tb.flush()
        elif force or time.monotonic() - self._synced >= self.sync_secs:
            storage.write_text(self.path, "".join(self.lines))
            self._tb.flush()
            self._synced = time.monotonic()

    def close(self) -> None:
        if not self.enabled:
            return
        self.flush(force=True)
        self._tb.close()
        if self._file is not None:
            self._file.close()


# ----------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    """Everything the loop needs, made by setup()."""

    config: object
    workdir: str
    mesh: jax.sharding.Mesh
    model_cfg: ModelConfig
    loss_cfg: object
    state: dict
    state_sh: dict
    data: GritBatches
    iterator: object
    manager: ocp.CheckpointManager
    step_fn: object
    start: int
    origin: str  # where the state came from: resumed / init_from / random


def checkpoint_manager(config, workdir: str) -> ocp.CheckpointManager:
    """Orbax manager of WORKDIR/checkpoints (state + data iterator); on gs:// Orbax commits a
    step with a marker file instead of renaming a directory."""
    return ocp.CheckpointManager(
        storage.join(workdir, "checkpoints"), item_names=("state", "data"),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                             enable_async_checkpointing=True, create=True))


def setup(config, workdir: str) -> Run:
    """Mesh, model, data, sharded train state (restored, from init_from, or random) and the
    compiled step. Nothing is written until the config has been checked against the workdir."""
    workdir = storage.normalize(workdir)
    if not storage.is_remote(workdir) and os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir={workdir} is a file, not a directory")
    mesh = trainer.mesh(config)
    resuming = checkpoint.latest_step(workdir) is not None
    model_cfg = run_model_config(config, workdir, resuming)
    trainer.validate(config, mesh, model_cfg)
    require_data_dir(config)
    lc = trainer.loss_config(config)
    data = GritBatches(PipelineConfig(
        resolve_data_dir(config), query_batch=config.data.query_batch,
        generative_batch=config.data.generative_batch, group_size=config.data.group_size,
        mode=lc.mode, seed=config.seed, num_threads=config.data.num_threads,
        buckets=parse_buckets(config.data.get("buckets")),
        mixture=config.data.get("mixture", ""),
        max_per_dataset=config.data.get("max_per_dataset", 0),
        num_epochs=config.total_steps))  # an upper bound: the dataset is indexed lazily
    if lc.gen_attention == "context" and not data.context_examples():
        raise ValueError(f"loss.gen_attention='context' reads the cached document of context "
                         f"chats bidirectionally; the generative data in use at "
                         f"{config.data.data_dir} has none (every pass would be causal)")
    if data.meta["tokenizer"]["vocab_size"] > model_cfg.vocab_size:
        raise ValueError(f"the data was tokenised with {data.meta['tokenizer']['vocab_size']} "
                         f"tokens, the model has vocab_size={model_cfg.vocab_size}")
    too_long = {k: v for k, v in data.meta.get("max_lengths", {}).items()
                if v > model_cfg.max_position_embeddings}
    if too_long:
        raise ValueError(f"{config.data.data_dir}: built with max lengths {too_long}, past the "
                         f"model's max_position_embeddings={model_cfg.max_position_embeddings}; "
                         f"rebuild it with smaller --max-*-length")
    tx, schedule = trainer.optimizer(config)  # compiles: after every check of the input
    state_sh = trainer.shardings(model_cfg, tx, mesh)
    write_workdir_files(config, workdir, model_cfg, data.meta)

    manager = checkpoint_manager(config, workdir)
    iterator = data.iterator()
    if manager.all_steps():  # resume: the initial weights are not read at all
        step, restored = restore_newest_intact(
            manager, trainer.abstract_state(model_cfg, tx, state_sh),
            strict=bool(config.get("strict_resume", False)))
        state, origin = restored["state"], f"resumed from step {step}"
        iterator.set_state(restored["data"])
    elif config.init_from:
        params = weights.load_params(config.init_from, model_cfg, state_sh["params"],
                                     new_params_seed=config.seed)
        state = trainer.state_from_params(params, tx, mesh, state_sh)
        origin = f"initialised from {config.init_from}"
    else:
        state = trainer.random_state(model_cfg, tx, mesh, state_sh, config.seed)
        origin = f"random init (seed {config.seed})"
    step_fn = jit_train_step(model_cfg, lc, tx, schedule, mesh, state_sh)
    return Run(config, workdir, mesh, model_cfg, lc, state, state_sh, data, iterator, manager,
               step_fn, int(jax.device_get(state["step"])), origin)


def restore_newest_intact(manager: ocp.CheckpointManager, target, strict: bool = False):
    """(step, restored items) of the newest checkpoint that restores; a damaged newer one is
    named on stderr and skipped (or stops the run when ``strict``). Every process tries the same
    steps and moves on together, so all of them resume from one step."""
    steps = sorted(manager.all_steps(), reverse=True)
    root = manager.directory
    for i, step in enumerate(steps):
        try:
            restored, problem = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())), None
        except Exception as e:  # noqa: BLE001 - Orbax, TensorStore and JSON errors alike
            restored, problem = None, checkpoint.damage(e)
        failed = np.asarray([problem is not None], np.int32)
        if jax.process_count() > 1:
            failed = np.asarray(multihost_utils.process_allgather(failed)).max(axis=0)
        if not failed[0]:
            return step, restored
        what = (f"{root}/{step}: checkpoint step {step} is damaged or incomplete ("
                f"{problem or 'on another process'})")
        if strict or i == len(steps) - 1:
            raise cli.UserError(what + ("; strict_resume is on: repair or remove it, or set "
                                        "--config.strict_resume=False to resume from an older one"
                                        if strict and i < len(steps) - 1 else
                                        "; no older checkpoint restores either: "
                                        "use a new --workdir"))
        if is_lead():
            kept = storage.set_aside(storage.join(root, str(step)),
                                     storage.join(os.path.dirname(root), "damaged_checkpoints"))
            print(f"warning: {what}; moved to {kept}; resuming from step {steps[i + 1]}",
                  file=sys.stderr, flush=True)
        barrier(f"grit_jax damaged checkpoint {step}")
        manager.reload()  # the step is free to be saved again
    raise AssertionError("unreachable")


def describe(run: Run) -> str:
    """The start-up lines: mesh, model, data, state placement, MFU reference."""
    per_device = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(run.state))
    kind = jax.devices()[0].device_kind
    peak = hardware.peak_flops(kind, run.config.get("peak_flops", 0.0))
    return "\n".join([
        f"mesh {dict(run.mesh.shape)} on {jax.device_count()} {jax.default_backend()} devices "
        f"({jax.process_count()} process{'es' if jax.process_count() > 1 else ''}); "
        f"{run.model_cfg.num_params() / 1e6:.1f}M parameters; {run.data.summary()}",
        f"train state {run.origin}: {per_device / 2**20:.1f} MiB per device",
        f"MFU against {peak / 1e12:.0f} TFLOP/s per device" if peak else
        f"MFU not reported: no peak FLOP/s known for {kind!r} (set --config.peak_flops)"])


# ----------------------------------------------------------------------------------------------
# The loop and its helpers
# ----------------------------------------------------------------------------------------------
class Throughput:
    """Tokens and model FLOPs read since the last logged row, as rates over all processes."""

    def __init__(self, run: Run):
        self.model_cfg, self.loss_cfg = run.model_cfg, run.loss_cfg
        self.peak = hardware.peak_flops(jax.devices()[0].device_kind,
                                        run.config.get("peak_flops", 0.0))
        self.tokens, self.flops, self.since = 0, 0.0, time.monotonic()

    def add(self, local: dict) -> None:
        self.tokens += sum(int(v.sum()) for k, v in local.items() if k.endswith("_valid"))
        self.flops += trainer.step_flops(self.model_cfg, local, self.loss_cfg)

    def rates(self) -> dict:
        """tokens_per_s and mfu since the last call (every process reads an equal share)."""
        dt, n = time.monotonic() - self.since, jax.process_count()
        out = {"tokens_per_s": self.tokens * n / dt,
               "mfu": self.flops * n / dt / (self.peak * jax.device_count()) if self.peak
               else None}
        self.tokens, self.flops, self.since = 0, 0.0, time.monotonic()
        return out


class Programs:
    """The step programs met so far (one per batch shape): compiled or read from the cache."""

    def __init__(self):
        self.seen, self.cache = set(), CacheCounter()

    def start(self, batch: dict) -> None:
        self.shapes = tuple(sorted((k, v.shape) for k, v in batch.items() if k.endswith("_ids")))
        self.t0, self.hits = time.monotonic(), self.cache.hits

    def finish(self) -> str | None:
        """A line announcing a new program (after its first step), else None."""
        if self.shapes in self.seen:
            return None
        self.seen.add(self.shapes)
        how = "from the persistent cache" if self.cache.hits > self.hits else "compiled"
        return (f"step program {len(self.seen)} ({how}, {time.monotonic() - self.t0:.1f}s with "
                f"its first step): " + ", ".join(f"{k[:-4]} {s[0]}x{s[1]}" for k, s in self.shapes))


class Checkpointing:
    """When to save and stop: every ``checkpoint_every`` steps, every ``checkpoint_every_minutes``
    and at once on a SIGTERM on any host; every host agrees, so all save the same steps."""

    def __init__(self, config):
        self.every, self.total = config.checkpoint_every, config.total_steps
        self.every_s = 60.0 * float(config.get("checkpoint_every_minutes", 0) or 0)
        self.signal, self.saved_at = None, time.monotonic()

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, lambda s, f: setattr(self, "signal", s))
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)

    def due(self, done: int) -> tuple[bool, bool]:
        """(save now, stop now) after step ``done``, the same on every process."""
        flags_ = np.asarray([bool(self.signal), self.every_s > 0 and
                             time.monotonic() - self.saved_at >= self.every_s], np.int32)
        if jax.process_count() > 1:
            flags_ = np.asarray(multihost_utils.process_allgather(flags_)).max(axis=0)
        stop, timed = bool(flags_[0]), bool(flags_[1])
        save = stop or timed or done % self.every == 0 or done == self.total
        if save:
            self.saved_at = time.monotonic()
        return save, stop


def save(run: Run, state, step: int, wait: bool = False) -> None:
    """Checkpoint the state and the data iterator's position (async unless ``wait``)."""
    run.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(run.iterator.get_state())),
        force=True)
    if wait:
        run.manager.wait_until_finished()


def check_finite(metrics: dict, step: int) -> None:
    """Stop the run (before checkpointing) on a NaN/inf loss."""
    bad = [k for k in ("loss_rep", "loss_gen", "loss") if not np.isfinite(metrics[k])]
    if bad:
        raise NonFiniteLoss(f"step {step}: {', '.join(bad)} is {metrics[bad[0]]} (not finite); "
                            f"stopping without checkpointing this state")


def train(config, workdir: str) -> list[dict]:
    """Train (or resume) in workdir; returns the logged metrics of this invocation."""
    run = setup(config, workdir)
    writer = MetricsWriter(run.workdir, enabled=is_lead())
    writer.note(describe(run))
    rate, programs = Throughput(run), Programs()
    batch_sh = sharding.batch_sharding(run.mesh)
    state, logged = run.state, []
    try:
        with Checkpointing(config) as checkpoints:
            for step in writer.progress(run.start, config.total_steps):
                local = next(run.iterator)
                rate.add(local)
                batch = global_batch(local, batch_sh, run.data.pad_id)
                programs.start(batch)
                with sharding.activate(run.mesh):
                    state, metrics = run.step_fn(state, batch)
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                writer.note(programs.finish())
                done = step + 1
                check_finite(m, done)
                if done % config.log_every == 0 or done == config.total_steps:
                    logged.append({"step": done, **m, **rate.rates(),
                                   "step_programs": len(programs.seen)})
                    writer.write(logged[-1])
                save_now, stop_now = checkpoints.due(done)
                if save_now:
                    save(run, state, done, wait=stop_now)
                    writer.flush(force=True)
                if stop_now:
                    writer.note(f"signal {checkpoints.signal or 'on another process'}: saved "
                                f"step {done}, exiting")
                    break
    finally:
        writer.close()
        run.manager.wait_until_finished()
        run.manager.close()
    return logged


def main(argv=None) -> int:
    """The command line: user errors are one line and exit 2 (grit_jax.cli)."""
    return cli.run(_main, argv)


def _main(argv) -> int:
    cli.absl_flags(argv, "python -m grit_jax.train")
    if FLAGS.config is None:
        raise cli.UserError("--config is required, e.g. --config configs/tiny.py")
    if not FLAGS.workdir:
        raise cli.UserError("--workdir is required (a local directory or gs://BUCKET/PATH)")
    initialize_distributed(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                           FLAGS.process_id, FLAGS.heartbeat_timeout)
    enable_compilation_cache(FLAGS.compilation_cache, storage.normalize(FLAGS.workdir))
    try:
        train(FLAGS.config, FLAGS.workdir)
    except NonFiniteLoss as e:
        raise cli.UserError(str(e)) from e
    return 0


if __name__ == "__main__":
    sys.exit(main())
