"""Meshes and the logical-axis rules: the one place that knows how model axes map onto devices.

Model code names logical axes only (``embed``, ``heads``, ``kv_heads``, ``head_dim``, ``mlp``, ``vocab``,
``batch``, ``length``, ``cache_length``, ``norm``, ``layers``). A rules table maps each to mesh axes of the mesh
``("data", "fsdp", "tensor")``. Two tables:

* ``TRAIN_RULES``: batch over data x fsdp, weights fully sharded over fsdp (ZeRO-3 style: gathered per
  layer by XLA) and split over tensor by heads / mlp / vocab (Megatron style).
* ``ROLLOUT_RULES``: the same, but weights are not split over fsdp, so a decode step on one host needs no
  all-gather of weights (the cost is one replicated copy per fsdp group, made once per RL step).

A dimension whose size is not divisible by its mesh axes is replicated instead (e.g. 2 kv heads on a
4-way tensor axis); :func:`logical_to_spec` reports it through ``fallbacks`` so it is never silent.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from typing import Any, Iterable, Mapping

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils, multihost_utils
from jax.experimental.layout import with_layout_constraint
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from realjax.scoped import scoped

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Mapping[str, Any]  # logical name -> None | mesh axis | tuple of mesh axes

TRAIN_RULES: Rules = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "length": None,
    "cache_length": None,
    "norm": None,
    # The stacked blocks' leading axis (scan_layers) and the KV cache's: every device holds all layers of
    # its shard; the scan reads one layer per step, so splitting layers over devices would serialise them.
    "layers": None,
}
ROLLOUT_RULES: Rules = {**TRAIN_RULES, "embed": None}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape; -1 on one axis takes all remaining devices (``mesh.data``, ``mesh.fsdp``, ``mesh.tensor``)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        dims = [self.data, self.fsdp, self.tensor]
        if sum(d == -1 for d in dims) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {dims}")
        if any(d == 0 or d < -1 for d in dims):
            raise ValueError(f"mesh axes must be positive or -1, got {dims}")
        known = math.prod(d for d in dims if d != -1)
        if -1 in dims:
            if num_devices % known:
                raise ValueError(f"{num_devices} devices cannot fill mesh {dims}")
            dims[dims.index(-1)] = num_devices // known
        if math.prod(dims) != num_devices:
            raise ValueError(f"mesh data={dims[0]} fsdp={dims[1]} tensor={dims[2]} needs {math.prod(dims)} "
                             f"devices, {num_devices} are available")
        return tuple(dims)


def make_mesh(cfg: MeshConfig | None = None, devices: Iterable | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over ``devices`` (default: all, every process)."""
    cfg = cfg or MeshConfig()
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.shape(len(devices))
    try:
        # Topology-aware placement on TPU/GPU (tensor axis on the fastest links).

        arr = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # CPU devices and odd counts: plain row-major order is right there
        arr = np.asarray(devices).reshape(shape)
    return Mesh(_rows_in_process_order(arr), MESH_AXES)


class ShardingError(ValueError):
    """A batch or mesh that cannot be laid out as the run needs (the message names both sizes)."""


def _rows_in_process_order(arr: np.ndarray) -> np.ndarray:
    """Reorder the batch positions (data x fsdp) of a device array so that process p's devices hold the
    p-th contiguous block of a batch's rows.

    Every process feeds its own block of prompts and rewards are all-gathered in process order, so the
    two orders must agree; a topology-aware mesh need not list devices by process. Only whole positions
    move (a position's tensor-parallel devices stay together), so the tensor axis keeps its links.
    """
    d, f, t = arr.shape
    flat = arr.reshape(d * f, t)
    procs = np.vectorize(lambda dev: getattr(dev, "process_index", 0))(flat)
    if (procs != procs[:, :1]).any():
        raise ShardingError(f"mesh.tensor={t} spans devices of several processes: each process must own whole "
                            "batch positions (make the tensor axis fit in one host)")
    counts = np.bincount(procs[:, 0])
    if len(set(counts[counts > 0])) > 1:
        raise ShardingError(f"processes own unequal numbers of batch positions {counts.tolist()}: every process "
                            "must feed the same number of rows")
    order = np.argsort(procs[:, 0], kind="stable")
    return flat[order].reshape(d, f, t)


def process_row_blocks(mesh: Mesh, rows: int, rules: Rules = TRAIN_RULES) -> dict[int, tuple[int, int]]:
    """For a ``rows``-row batch sharded by ``rules``: each process's [start, stop) of rows."""
    sharding = batch_sharding(mesh, (rows,), rules)
    spans: dict[int, list[int]] = {}
    for device, index in sharding.devices_indices_map((rows,)).items():
        start, stop, _ = index[0].indices(rows)
        span = spans.setdefault(device.process_index, [start, stop])
        span[0], span[1] = min(span[0], start), max(span[1], stop)
    return {p: (a, b) for p, (a, b) in sorted(spans.items())}


def logical_to_spec(axes: tuple[str | None, ...] | None, shape: tuple[int, ...], mesh: Mesh, rules: Rules,
                    fallbacks: list | None = None) -> PartitionSpec:
    """The PartitionSpec for an array with logical ``axes``; non-divisible dimensions are replicated."""
    if axes is None:
        return PartitionSpec()
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        target = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1 and a not in used)
        n = math.prod(mesh.shape[a] for a in mesh_axes)
        if mesh_axes and size % n:
            if fallbacks is not None:
                fallbacks.append((axes, shape, name, mesh_axes))
            mesh_axes = ()
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*spec)


def named(axes, shape, mesh: Mesh, rules: Rules) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, tuple(shape), mesh, rules))


def state_shardings(state, mesh: Mesh, rules: Rules):
    """Shardings for an ``nnx.State`` (abstract or concrete) from each Variable's ``axes`` metadata."""
    def one(var):
        return var.replace(named(var.get_metadata().get("axes"), var.get_value().shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, shape: tuple[int, ...], rules: Rules = TRAIN_RULES, *, axis: int = 0) -> NamedSharding:
    """Rows (dimension ``axis``) over the batch mesh axes, every other dimension replicated.

    Rows that do not divide over those devices are a ``ShardingError``, never a silent replication (which
    would run every row on every device)."""
    devices = batch_rows_multiple(mesh, rules)
    if shape[axis] % devices:
        raise ShardingError(f"a batch of {shape[axis]} rows does not split evenly over the {devices} "
                            "data-parallel devices of the mesh")
    axes = tuple("batch" if d == axis else None for d in range(len(shape)))
    return NamedSharding(mesh, logical_to_spec(axes, tuple(shape), mesh, rules))


def batch_rows_multiple(mesh: Mesh, rules: Rules = TRAIN_RULES) -> int:
    """How many devices a batch is split over: the row count must be a multiple of this."""
    target = rules["batch"]
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    return math.prod(mesh.shape[a] for a in axes)


def put_batch(tree, mesh: Mesh, rules: Rules = TRAIN_RULES, *, axis: int = 0):
    """Place host arrays (the same global batch on every process) row-sharded on the mesh; rows are
    dimension ``axis`` (1 for ``[micro_batches, rows, ...]`` update batches)."""
    def one(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.shape, rules, axis=axis)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(one, tree)


# ----------------------------------------------------------------------------------------------------
# Activation constraints: the model calls `constrain(x, axes)`; it is a no-op outside `use_rules`.
# ----------------------------------------------------------------------------------------------------
_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("realjax_rules", default=None)


def use_rules(mesh: Mesh | None, rules: Rules = TRAIN_RULES):
    """Within this block (at trace time), model activations are constrained to ``rules`` on ``mesh``."""
    return scoped(_ACTIVE, (mesh, rules) if mesh is not None else None)


def constrain(x, axes: tuple[str | None, ...]):
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, named(axes, x.shape, mesh, rules))


def constrain_layout(x, axes: tuple[str | None, ...], layout):
    """``x`` pinned to the memory ``layout`` (``jax.experimental.layout.Layout``) of each device's shard.

    Under ``use_rules`` the constraint runs inside ``shard_map`` on the local shards (laid out by ``axes``):
    XLA's partitioner does not know the ``LayoutConstraint`` custom call, so on a sharded global array it
    gathered the operand onto every device first (the scanned decode's KV cache on fsdp=2 x tensor=4: the
    whole cache of all 8 chips on each, per layer). Layout is per device, so a local constraint is the same
    constraint."""
    active = _ACTIVE.get()
    if active is None:
        return with_layout_constraint(x, layout)
    mesh, rules = active
    spec = logical_to_spec(axes, x.shape, mesh, rules)
    return jax.shard_map(lambda y: with_layout_constraint(y, layout), mesh=mesh, in_specs=spec, out_specs=spec,
                         check_vma=False)(x)


def to_host(x) -> np.ndarray:
    """The whole (global) array as numpy on this host, gathering across processes when needed."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def allgather_host(x: np.ndarray) -> np.ndarray:
    """Concatenate every process's host array (same shape on all) along axis 0, in process order."""
    if jax.process_count() == 1:
        return np.asarray(x)

    return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def put_local_batch(tree, mesh: Mesh, rules: Rules = TRAIN_RULES):
    """Place this process's rows (its contiguous block of the global batch) as global row-sharded arrays."""
    def one(x):
        x = np.asarray(x)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        sharding = batch_sharding(mesh, global_shape, rules)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(one, tree)
