"""Device mesh and the one table of logical-axis -> mesh-axis rules (t5x / MaxText style)."""

from __future__ import annotations

import contextlib
import math
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
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
)


def make_mesh(shape: Sequence[int] | Mapping[str, int] = (1, -1, 1),
              axes: Sequence[str] = MESH_AXES, devices=None) -> Mesh:
    """A mesh over devices with the given axis sizes; one -1 takes the remaining devices.

    shape: sizes in ``axes`` order, a mapping axis -> size (missing axes: 1), or for the default
    axes a 3-sequence (data, fsdp, tensor) meaning expert = 1.
    """
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(shape, Mapping):
        unknown = sorted(set(shape) - set(axes))
        if unknown:
            raise ValueError(f"mesh axes {unknown} unknown (expected some of {tuple(axes)})")
        shape = [int(shape.get(a, 1)) for a in axes]
    elif tuple(axes) == MESH_AXES and len(shape) == 3:
        shape = [shape[0], shape[1], 1, shape[2]]
    shape = list(shape)
    if len(shape) != len(axes):
        raise ValueError(f"mesh shape {shape} does not match axes {tuple(axes)}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh shape {shape}: {len(devices)} devices are not divisible by {known}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, "
                         f"{len(devices)} available")
    return Mesh(np.asarray(devices).reshape(shape), tuple(axes))


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
                problems.append(f"{jax.tree_util.keystr(path)} dim {dim} ({leaf.names[dim]}={size}) "
                                f"over mesh axes {axes} (size {n})")
    if problems:
        raise ValueError("Parameters do not divide over the mesh: " + "; ".join(problems))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a batch-major array: batch over (data, fsdp, expert), the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def batch_shards(mesh=None) -> int:
    """How many ways a mesh (default: the one in scope) splits the batch (data x fsdp x
    expert); 1 outside any mesh."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return 1 if mesh.empty else math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)


@contextlib.contextmanager
def activate(mesh: Mesh, rules=LOGICAL_RULES):
    """Mesh + logical rules in scope, so the model's activation constraints apply."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
