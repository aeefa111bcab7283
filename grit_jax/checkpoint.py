"""Orbax params checkpoints: ``DIR/params`` (the weights) beside ``DIR/grit_config.json``."""

from __future__ import annotations

import logging

import jax
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict

from grit_jax import storage
from grit_jax.config import ModelConfig
from grit_jax.model import param_shapes

PARAMS_SUBDIR = "params"


class _HealthyCheckpointNoise(logging.Filter):
    """Orbax warns "Metadata file does not exist: .../_CHECKPOINT_METADATA" whenever an item
    folder (``params/``, ``checkpoints/N/state``) is read directly: that file lives one level up,
    and the checkpoint is healthy. A damaged one fails its restore and is reported there."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "_CHECKPOINT_METADATA" not in record.getMessage()


logging.getLogger("absl").addFilter(_HealthyCheckpointNoise())


class _AbandonedReads(logging.Filter):
    """A failed restore abandons the step's other reads, which fail too; asyncio would log each
    as "Future exception was never retrieved" with a traceback once collected. The one-line
    error of :func:`damage` already names the damaged step."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "exception was never retrieved" not in record.getMessage()


def save_params(params, config: ModelConfig, directory: str) -> str:
    """Write params with Orbax and the model config as JSON; returns the params path."""
    directory = storage.normalize(directory)
    storage.makedirs(directory)
    path = storage.join(directory, PARAMS_SUBDIR)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params, force=True)
    config.save(directory)
    return path


def read_params(path: str, step: int | None = None):
    """(params, ModelConfig) of a params directory or a training workdir (newest checkpoint, or
    ``step``) on the first local device, as export reads them (any source, sharded:
    grit_jax.weights)."""
    path = storage.normalize(path)
    config = ModelConfig.load(path)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = param_shapes(config, jax.tree.map(lambda _: device, param_shapes(config)))
    if is_workdir(path):
        return restore_workdir_params(path, target, step), config
    if step is not None:
        raise ValueError(f"--step {step}: {path} is a params directory (one state), not a "
                         f"training workdir")
    return restore_params(path, target), config


def restore_params(directory: str, target):
    """Restore ``DIR/params`` onto ``target`` (ShapeDtypeStructs with shardings): each process
    reads only its own shards. Without target shardings Orbax would fall back to the sharding
    stored at save time (one device of the machine that wrote it: "Topology mismatch" anywhere
    else), so they are required."""
    path = storage.join(storage.normalize(directory), PARAMS_SUBDIR)
    if not storage.isdir(path):
        raise FileNotFoundError(f"{path}: no Orbax params checkpoint here")
    with ocp.StandardCheckpointer() as ckptr:
        check_matches(ckptr.metadata(path).item_metadata.tree, target, path,
                      storage.join(directory, "grit_config.json"))
        return ckptr.restore(path, target)


def check_matches(stored, abstract, path: str, model_source: str) -> None:
    """Stored arrays against the shapes the model (described in model_source) expects, by name;
    Orbax would restore stored shapes whatever the target says."""
    have = {"/".join(k): tuple(v.shape) for k, v in flatten_dict(stored).items()}
    want = {"/".join(k): tuple(v.shape) for k, v in flatten_dict(abstract).items()}
    problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
    problems += [f"{k} has shape {have[k]}, config expects {want[k]}"
                 for k in sorted(set(have) & set(want)) if have[k] != want[k]]
    if problems:
        raise ValueError(f"{path}: does not match the model in {model_source}: "
                         + "; ".join(problems[:6]))


def latest_step(workdir: str) -> int | None:
    """The newest finished checkpoint step of a training workdir (None if none)."""
    steps = workdir_steps(workdir)
    return steps[-1] if steps else None


def workdir_steps(workdir: str) -> list[int]:
    """Finished checkpoint steps of a training workdir, oldest first."""
    root = storage.join(storage.normalize(workdir), "checkpoints")
    return sorted(int(d) for d in storage.listdir(root)
                  if d.isdigit() and storage.exists(storage.join(root, d, "state")))


def damage(e: BaseException) -> str:
    """What a failed restore says, in one short line (TensorStore errors run to 100+ lines);
    from then on the restore's abandoned reads stay out of the log (``_AbandonedReads``)."""
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedReads) for f in asyncio_log.filters):
        asyncio_log.addFilter(_AbandonedReads())
    text = " ".join(str(e).split()).split(" See full TensorStore details")[0] or type(e).__name__
    return text if len(text) <= 240 else text[:240] + " ..."


def is_workdir(path: str) -> bool:
    """Whether path is a training workdir (``checkpoints/`` beside ``grit_config.json``)."""
    return storage.isdir(storage.join(storage.normalize(path), "checkpoints"))


def restore_workdir_params(workdir: str, target, step: int | None = None):
    """The parameters of a workdir checkpoint (newest, or ``step``) restored onto ``target``
    (ShapeDtypeStructs with shardings); the optimizer state is not read."""
    workdir = storage.normalize(workdir)
    step = latest_step(workdir) if step is None else step
    path = storage.join(workdir, "checkpoints", str(step), "state")
    if step is None or not storage.isdir(path):
        raise FileNotFoundError(f"{workdir}: no checkpoint"
                                f"{'' if step is None else f' for step {step}'}"
                                f" under checkpoints/")
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(dtype=a.dtype, sharding=a.sharding),
                                target)
    with ocp.PyTreeCheckpointer() as ckptr:
        try:
            stored = ckptr.metadata(path).item_metadata.tree["params"]
        except Exception as e:  # noqa: BLE001 - Orbax/TensorStore/JSON errors of a damaged step
            raise _damaged(workdir, step, e) from e
        check_matches(stored, target, path, storage.join(workdir, "grit_config.json"))
        try:
            restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(
                item={"params": target}, restore_args={"params": restore_args},
                partial_restore=True))
        except Exception as e:  # noqa: BLE001
            raise _damaged(workdir, step, e) from e
    return restored["params"]


def _damaged(workdir: str, step: int, e: BaseException) -> ValueError:
    others = [s for s in workdir_steps(workdir) if s != step]
    return ValueError(f"{storage.join(workdir, 'checkpoints', str(step))}: checkpoint step {step} "
                      f"is damaged or incomplete ({damage(e)}); "
                      + (f"choose another step (here: {', '.join(map(str, others))})" if others
                         else "no other checkpoint is here"))
