"""Scale-out with JAX's own machinery: a ``Mesh`` of ``data`` × ``fsdp``, ``NamedSharding`` rules for
the batch, the frozen 4-bit base, the adapters and the optimizer state, and multi-host start-up.

    mesh = make_mesh({"data": -1, "fsdp": 4})          # -1: the devices left over
    frozen = place(frozen, frozen_shardings(frozen, mesh))
    params = place(params, to_shardings(tree_specs(params, mesh.shape["fsdp"], "fsdp"), mesh))
    with jax.set_mesh(mesh):                             # LoRADense gathers each base weight
        state, metrics = train_step(state, frozen, global_batch(batch, batch_sharding(mesh, 3)), rng)

Rules:

* The batch is split over ``data`` and ``fsdp`` together (FSDP is data parallel too).
* A frozen :class:`~qlora_jax.quant.QuantizedTensor` ``[out, in]`` is split along its ``out`` rows
  in block-aligned pieces: the packed bytes, the absmax (or double-quant codes) and the nested
  scales of the same rows go to the same device and the offset is replicated, so each device's
  pieces dequantize on their own. A tensor that does not split into whole rows, blocks and nested
  blocks (e.g. 128 × 128 with nested block 256 over 4 devices) is replicated. Inside the model
  :func:`gather` all-gathers the 4-bit weight of one layer right before its matmul (forward, and
  again in the backward pass), so only one layer's full weight is resident at a time with remat.
* Other arrays (embeddings, norms, adapters, moments) under ``"fsdp"`` split their largest
  dimension that ``fsdp`` divides, or are replicated; under ``"replicated"`` every device holds
  all of it. Optimizer moments shaped like their parameter get the parameter's split; the
  ``pinned_host`` memory kind of paged moments is kept.

Multi-host: :func:`initialize_distributed` wraps ``jax.distributed.initialize``; every process
builds the same (deterministic) batches and :func:`global_batch` puts on each device only the rows
that device holds.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qlora_jax.quant import QuantizedTensor, is_quantized

AXES = ("data", "fsdp")
BATCH_AXES = AXES  # the batch is split over both
MODES = ("replicated", "fsdp")


def make_mesh(axes: Mapping[str, int], devices=None, what: str = "config.mesh") -> Mesh:
    """A ``Mesh`` with axes ``("data", "fsdp")`` over ``devices`` (default: all devices, every host).

    ``axes`` gives each axis' size; one may be ``-1`` (all devices left). Auto (GSPMD) axes: jitted
    code propagates shardings from its arguments.
    """
    axes = dict(axes)
    unknown = set(axes) - set(AXES)
    if unknown:
        raise ValueError(f"{what}: unknown axes {sorted(unknown)}; the axes are {AXES}")
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(axes.get(a, 1)) for a in AXES]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"{what}: sizes must be positive, with at most one -1; got {axes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{what}={axes}: {len(devices)} devices do not split into {known} × (-1)")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"{what}={axes} needs {math.prod(sizes)} devices; there are {len(devices)} "
            "(set -1 on one axis to use all of them)"
        )
    return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0, memory_kind: str | None = None) -> NamedSharding:
    """Rows (``batch_axis``) split over ``data`` × ``fsdp``; other dimensions whole."""
    spec = [None] * ndim
    spec[batch_axis] = BATCH_AXES
    return NamedSharding(mesh, P(*spec), memory_kind=memory_kind)


def check_batch_size(mesh: Mesh, batch_size: int, what: str = "config.train.batch_size") -> None:
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % ways:
        raise ValueError(
            f"{what}={batch_size} must be divisible by data × fsdp = {ways} (config.mesh={dict(mesh.shape)})"
        )


def _spec_largest_divisible(shape: tuple[int, ...], ways: int, skip_leading: bool = False) -> P:
    if ways == 1:
        return P()
    first = 1 if skip_leading and len(shape) > 1 else 0
    dims = sorted(range(first, len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if shape[d] % ways == 0:
            spec = [None] * len(shape)
            spec[d] = "fsdp"
            return P(*spec)
    return P()


def _check_mode(mode: str, what: str) -> None:
    if mode not in MODES:
        raise ValueError(f"{what} must be one of {MODES}; got {mode!r}")


def array_spec(shape: tuple[int, ...], fsdp: int, mode: str, what: str = "sharding mode", stacked: bool = False) -> P:
    """The rule for one plain array of ``shape`` under ``mode`` on ``fsdp`` devices.

    ``stacked``: a scanned layer's leaf ``[L, ...]``; its layer axis is never split, so every
    device holds a piece of every layer (the loader fills one layer at a time).
    """
    _check_mode(mode, what)
    return P() if mode == "replicated" else _spec_largest_divisible(tuple(shape), fsdp, skip_leading=stacked)


def array_sharding(x, mesh: Mesh, mode: str, what: str = "sharding mode") -> NamedSharding:
    """The sharding rule for one plain array under ``mode`` (``"replicated"`` | ``"fsdp"``).

    The array's memory kind (``pinned_host`` for paged moments) is kept.
    """
    kind = getattr(getattr(x, "sharding", None), "memory_kind", None)
    return NamedSharding(mesh, array_spec(tuple(np.shape(x)), mesh.shape["fsdp"], mode, what), memory_kind=kind)


def quantized_splits(shape: tuple[int, ...], block_size: int, nested_block_size: int | None, fsdp: int) -> bool:
    """Whether an ``[out, in]`` QuantizedTensor splits over ``fsdp`` devices into whole rows,
    whole quantization blocks and (with double quantization, ``nested_block_size`` not None)
    whole nested blocks: the rule of :func:`quantized_spec`."""
    if fsdp == 1 or len(shape) != 2 or shape[0] % fsdp:
        return False
    shard = shape[0] // fsdp * shape[1]
    if shard % block_size:
        return False
    return nested_block_size is None or (shard // block_size) % nested_block_size == 0


def quantized_spec(qt: QuantizedTensor, fsdp: int) -> QuantizedTensor:
    """A QuantizedTensor of PartitionSpecs: its ``out`` rows split block-aligned over ``fsdp``
    (each layer's, when layers are stacked for a scan).

    A tensor is split only when :func:`quantized_splits`: every device then gets whole rows, whole
    quantization blocks and whole nested blocks, so each device's pieces form a QuantizedTensor of
    ``out / fsdp`` rows on their own; the offset is replicated. Otherwise it is replicated.
    ``qt`` may be abstract (ShapeDtypeStruct leaves).
    """
    whole = quantized_splits(qt.shape, qt.block_size, qt.nested_block_size, fsdp)
    lead = (None,) * (np.ndim(qt.packed) - 1)  # stacked layers: split each layer's rows, not the layer axis
    s = P(*lead, "fsdp") if whole else P()
    return qt.replace(
        packed=s,
        absmax=s,
        nested_absmax=None if qt.nested_absmax is None else s,
        offset=None if qt.offset is None else P(),
    )


def quantized_sharding(qt: QuantizedTensor, mesh: Mesh) -> QuantizedTensor:
    """:func:`quantized_spec` as NamedShardings on ``mesh``."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), quantized_spec(qt, mesh.shape["fsdp"]))


def base_specs(base, fsdp: int):
    """PartitionSpecs for the base tree: QuantizedTensors by rows, other arrays by the fsdp rule
    (a scanned ``layers`` subtree's layer axis kept whole)."""

    def spec(path, x):
        if is_quantized(x):
            return quantized_spec(x, fsdp)
        stacked = bool(path) and getattr(path[0], "key", None) == "layers"
        return array_spec(tuple(np.shape(x)), fsdp, "fsdp", stacked=stacked)

    return jax.tree_util.tree_map_with_path(spec, base, is_leaf=is_quantized)


def frozen_shardings(frozen, mesh: Mesh):
    """Shardings for the base tree (:func:`base_specs` on ``mesh``)."""
    return to_shardings(base_specs(frozen, mesh.shape["fsdp"]), mesh)


def tree_specs(tree, fsdp: int, mode: str, what: str = "sharding mode"):
    """PartitionSpecs for adapters or optimizer state: every leaf by :func:`array_spec`."""
    return jax.tree.map(lambda x: array_spec(tuple(np.shape(x)), fsdp, mode, what), tree)


def _is_spec(x) -> bool:
    return isinstance(x, P)


def to_shardings(specs, mesh: Mesh, kinds=None):
    """A tree of PartitionSpecs (and optionally of memory kinds, same structure) -> NamedShardings."""
    if kinds is None:
        return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)
    return jax.tree.map(
        lambda s, k: NamedSharding(mesh, s, memory_kind=None if k == "device" else k), specs, kinds, is_leaf=_is_spec
    )


def spec_ways(spec: P, mesh_shape) -> int:
    """Into how many pieces ``spec`` splits an array on a mesh of ``mesh_shape`` ({axis: size})."""
    ways = 1
    for entry in spec:
        for axis in (entry,) if isinstance(entry, str) else (entry or ()):
            ways *= mesh_shape[axis]
    return ways


def place(tree, shardings):
    """``device_put`` every leaf of ``tree`` to its sharding (a tree of the same structure).

    Works across hosts: each process keeps the pieces its devices own (the values must be the same
    on every process, as they are for deterministic inits and loads).
    """
    return jax.tree.map(lambda x, s: _put(x, s), tree, shardings)


def _put(x, sharding: NamedSharding):
    if isinstance(x, jax.Array) and x.is_fully_addressable and jax.process_count() > 1:
        x = np.asarray(x)  # a process-local value: let each process place its own pieces
    if isinstance(x, np.ndarray) or np.isscalar(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
    return jax.device_put(x, sharding)


def global_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
    """The same host batch on every process → global arrays; each device receives only its rows."""
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx]) for k, v in batch.items()}


def _active_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or all(size == 1 for size in mesh.shape.values()):
        return None
    return mesh


def shard_batch(x):
    """Inside jit under a mesh: keep activations ``[B, ...]`` split by rows over ``data`` × ``fsdp``.

    Without it GSPMD may carry a weight's ``fsdp`` split into the attention heads and then
    replicate whole activations to undo it (XLA warns "involuntary full rematerialization").
    """
    mesh = _active_mesh()
    if mesh is None or x.shape[0] % math.prod(mesh.shape[a] for a in BATCH_AXES):
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


def gather(x):
    """All-gather ``x`` (a QuantizedTensor's arrays, or an array) inside jit when a mesh is set.

    Called by ``LoRADense`` on its frozen kernel: the 4-bit bytes travel, not a dequantized copy.
    Outside a mesh context (``jax.set_mesh``) it returns ``x`` unchanged.
    """
    if _active_mesh() is None:
        return x
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, P()), x)


def to_host(tree):
    """Global arrays → numpy on every process (an all-gather across hosts when there are several)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer; got {value!r}") from None


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> bool:
    """``jax.distributed.initialize`` from arguments, else from ``QLORA_COORDINATOR_ADDRESS``,
    ``QLORA_NUM_PROCESSES`` and ``QLORA_PROCESS_ID``. Returns whether it initialized (a single
    process — no address given — needs nothing). Call before any other JAX call."""
    address = coordinator_address or os.environ.get("QLORA_COORDINATOR_ADDRESS", "")
    n = num_processes or _env_int("QLORA_NUM_PROCESSES", 0)
    pid = process_id if process_id >= 0 else _env_int("QLORA_PROCESS_ID", -1)
    if not address:
        if n > 1 or pid > 0:  # each process would think it is the only one, all writing one workdir
            raise ValueError(
                f"multi-host: num_processes={n}, process_id={pid} given without a coordinator address "
                "(--coordinator_address or QLORA_COORDINATOR_ADDRESS)"
            )
        return False
    if n < 1 or not 0 <= pid < n:
        raise ValueError(
            f"multi-host: coordinator {address!r} needs num_processes >= 1 and 0 <= process_id < num_processes; "
            f"got num_processes={n}, process_id={pid} (flags --num_processes/--process_id or "
            "QLORA_NUM_PROCESSES/QLORA_PROCESS_ID)"
        )
    jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=pid)
    return True
