"""Device mesh and the one table of logical-axis -> mesh-axis rules (t5x / MaxText style)."""

from __future__ import annotations

import contextlib
import math
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the expert axis also splits the batch (MaxText-style)

# Logical axis name -> mesh axis (or axes, or None = replicated).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),  # the LM head's output axis
    # The input embedding table is sharded on its embedding axis only: a row gather from a
    # vocab-sharded table needs an all-gather anyway, and with data, fsdp and tensor all > 1 it
    # deadlocked XLA:CPU's collectives (seen with jax 0.10.2 on a (2, 2, 2) mesh).
    ("embed_vocab", None),
    ("mlp", "tensor"),
    ("expert", "expert"),  # a mixture of experts' expert axis: expert parallelism
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("projection", None),  # the embedding head's output axis (small: replicated)
    ("lora_rank", None),  # LoRA adapters' rank axis (their other axis follows the weight's)
)


def _axis_sizes(shape, axes: Sequence[str], what: str) -> list[int]:
    """Sizes in ``axes`` order from a sequence or a mapping (missing axes: 1); for the default
    axes a 3-sequence (data, fsdp, tensor) means expert = 1."""
    if isinstance(shape, Mapping):
        unknown = sorted(set(shape) - set(axes))
        if unknown:
            raise ValueError(f"{what} axes {unknown} unknown (expected some of {tuple(axes)})")
        return [int(shape.get(a, 1)) for a in axes]
    shape = list(shape)
    if tuple(axes) == MESH_AXES and len(shape) == 3:
        shape = [shape[0], shape[1], 1, shape[2]]
    if len(shape) != len(axes):
        raise ValueError(f"{what} shape {shape} does not match axes {tuple(axes)}")
    return shape


def _resolve(shape: list[int], n: int, what: str) -> list[int]:
    """Fill the one -1 so that the sizes multiply to n."""
    if shape.count(-1) > 1:
        raise ValueError(f"{what} shape {shape}: at most one -1")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"{what} shape {shape}: sizes must be positive (or one -1)")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n % known:
            raise ValueError(f"{what} shape {shape}: {n} devices are not divisible by {known}")
        shape[shape.index(-1)] = n // known
    if math.prod(shape) != n:
        raise ValueError(f"{what} shape {shape} needs {math.prod(shape)} devices, {n} available")
    return shape


def num_slices(devices, dcn_requested: bool = False) -> tuple[int, bool]:
    """(slices, by_process): TPU devices name their slice (``slice_index``); elsewhere, when a
    DCN layout is asked for, every process counts as a slice (how several CPU processes stand
    in for a multislice pod in tests)."""
    if devices[0].platform == "tpu":
        return len({getattr(d, "slice_index", 0) for d in devices}), False
    if dcn_requested:
        return len({d.process_index for d in devices}), True
    return 1, False


def make_mesh(shape: Sequence[int] | Mapping[str, int] = (1, -1, 1),
              axes: Sequence[str] = MESH_AXES, devices=None,
              dcn_shape: Sequence[int] | Mapping[str, int] | None = None) -> Mesh:
    """A mesh over devices: ``shape`` inside each slice (ICI), ``dcn_shape`` across slices.

    shape: sizes in ``axes`` order, a mapping axis -> size (missing axes: 1), or for the default
    axes a 3-sequence (data, fsdp, tensor) meaning expert = 1; one -1 takes the remaining
    devices of a slice. dcn_shape: the same for the data-centre network between slices (one -1
    takes the remaining slices; default: all slices on one -1-free axis is an error, so give
    e.g. ``{"data": -1}``); the mesh axis sizes are the products. With one slice dcn_shape must
    resolve to all ones.
    """
    devices = list(jax.devices() if devices is None else devices)
    ici = _axis_sizes(shape, axes, "mesh")
    dcn = _axis_sizes(dcn_shape, axes, "dcn_mesh") if dcn_shape is not None else [1] * len(axes)
    requested = math.prod(abs(s) for s in dcn) > 1 and -1 not in dcn
    slices, by_process = num_slices(devices, requested)
    dcn = _resolve(dcn, slices, "dcn_mesh")
    if len(devices) % slices:
        raise ValueError(f"{len(devices)} devices do not split into {slices} equal slices")
    ici = _resolve(ici, len(devices) // slices, "mesh")
    if slices == 1:
        if devices[0].platform == "tpu":  # follow the physical torus (ICI rings)
            grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
        else:
            grid = np.asarray(devices).reshape(ici)
    else:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                    process_is_granule=by_process,
                                                    allow_split_physical_axes=True)
    return Mesh(grid, tuple(axes))


def logical_to_spec(logical: Sequence[str | None], rules=LOGICAL_RULES) -> P:
    """PartitionSpec for a tuple of logical axis names."""
    return nn.logical_to_mesh_axes(tuple(logical), rules)


def param_shardings(boxed_abstract, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for a boxed (logically annotated) parameter tree."""
    specs = nn.get_partition_spec(boxed_abstract)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def check_divisible(boxed_abstract, mesh: Mesh, rules=LOGICAL_RULES) -> None:
    """Fail before compiling when a sharded dimension does not divide by its mesh axes."""
    problems = []
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed_abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for path, leaf in leaves:
        if not isinstance(leaf, nn.LogicallyPartitioned):
            continue
        spec = logical_to_spec(leaf.names, rules)
        for dim, (size, axes) in enumerate(zip(leaf.value.shape, spec)):
            if axes is None:
                continue
            n = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
            if size % n:
                problems.append(f"{jax.tree_util.keystr(path)} dim {dim} "
                                f"({leaf.names[dim]}={size}) over mesh axes {axes} (size {n})")
    if problems:
        raise ValueError("Parameters do not divide over the mesh: " + "; ".join(problems))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a batch-major array: batch over (data, fsdp, expert), the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


# Inside a data group (grit_jax.train_step.per_group_grad: one data-parallel replica's rows,
# vmapped with spmd_axis_name="data") the batch is split over the remaining batch axes.
GROUP_BATCH_AXES = tuple(a for a in BATCH_AXES if a != "data")
GROUP_RULES = tuple(("batch", GROUP_BATCH_AXES) if name == "batch" else (name, axes)
                    for name, axes in LOGICAL_RULES)


def batch_axes() -> tuple[str, ...]:
    """The mesh axes the batch is split over under the logical rules in scope (all of
    BATCH_AXES, or GROUP_BATCH_AXES inside a data group)."""
    for name, axes in nn.get_logical_axis_rules() or LOGICAL_RULES:
        if name == "batch":
            return (axes,) if isinstance(axes, str) else tuple(axes or ())
    return BATCH_AXES


def batch_shards(mesh=None) -> int:
    """How many ways a mesh (default: the one in scope) splits the batch (data x fsdp x
    expert, or fsdp x expert inside a data group); 1 outside any mesh."""
    axes = BATCH_AXES if mesh is not None else batch_axes()
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return 1 if mesh.empty else math.prod(mesh.shape.get(a, 1) for a in axes)


def data_groups() -> int:
    """Size of the mesh's data axis in scope (1 outside a mesh or inside a data group)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "data" not in batch_axes():
        return 1
    return mesh.shape.get("data", 1)


@contextlib.contextmanager
def within_data_group():
    """Logical rules for code vmapped over the data axis: the batch splits over the rest."""
    with nn.logical_axis_rules(GROUP_RULES):
        yield


@contextlib.contextmanager
def activate(mesh: Mesh, rules=LOGICAL_RULES):
    """Mesh + logical rules in scope, so the model's activation constraints apply."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
