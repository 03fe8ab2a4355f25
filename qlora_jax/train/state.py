"""The abstract train state: built once, the single source of truth for layout, placement and bytes.

Following big_vision: the state ``{base, params, opt_state}`` is first built without allocating
anything (``jax.eval_shape`` of the model's init and of the optimizer's init); the shardings are
derived from it by :mod:`qlora_jax.parallel`'s rules as ``PartitionSpec``\\s, the optimizer
says which leaves live in host memory, and then the real arrays are created or loaded straight
into those shardings. The planner (:mod:`qlora_jax.train.memory`) counts bytes from the same
tree and the same specs, so what it counts is what the train step holds.

    layout = state_layout(model, opt, trainable="lora", fsdp=4, params_mode="replicated", opt_mode="replicated")
    shardings = layout.shardings(mesh)                  # TrainTree of NamedShardings
    layout.device_bytes({"data": 2, "fsdp": 4})          # per device, by part and memory kind
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from qlora_jax import parallel, quant
from qlora_jax.nn.lora import split_params
from qlora_jax.optim import Optimizer

TRAINABLE = ("lora", "full")


class TrainTree(NamedTuple):
    """The parts of a training run's state (arrays, ShapeDtypeStructs, specs or memory kinds)."""

    base: Any  # the "base" collection: frozen under LoRA; empty under trainable='full'
    params: Any  # what trains: the adapters, or (trainable='full') the base itself
    opt_state: Any


def abstract_variables(model, example_len: int = 1) -> dict:
    """``model.init``'s variables as ShapeDtypeStructs (no allocation; a 65B model in seconds)."""
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, example_len), jnp.int32))


def quantized_leaves(tree) -> list:
    """The QuantizedTensors of ``tree``."""
    return [x for x in jax.tree.leaves(tree, is_leaf=quant.is_quantized) if quant.is_quantized(x)]


def _nbytes(x) -> int:
    return int(np.prod(x.shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """The abstract state, the PartitionSpec and the memory kind of each of its leaves.

    ``abstract``, ``specs`` and ``kinds`` are :class:`TrainTree`\\s of the same structure
    (QuantizedTensor nodes included: their arrays are leaves like any other).
    """

    abstract: TrainTree
    specs: TrainTree
    kinds: TrainTree
    trainable: str

    @property
    def collection(self) -> str:
        """The variable collection that trains: ``"params"`` (LoRA) or ``"base"`` (full)."""
        return "base" if self.trainable == "full" else "params"

    def shardings(self, mesh) -> TrainTree:
        """NamedShardings on ``mesh`` (paged moments keep their ``pinned_host`` memory kind)."""
        return TrainTree(*(parallel.to_shardings(s, mesh, k) for s, k in zip(self.specs, self.kinds, strict=True)))

    def leaves(self, part: str):
        """``(path, ShapeDtypeStruct, PartitionSpec, memory kind)`` of every array of one part."""
        tree, specs, kinds = (getattr(t, part) for t in (self.abstract, self.specs, self.kinds))
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
        kind_leaves = jax.tree.leaves(kinds)
        return [(path, x, s, k) for (path, x), s, k in zip(flat, spec_leaves, kind_leaves, strict=True)]

    def device_bytes(self, mesh_shape: Mapping[str, int]) -> dict[str, dict[str, int]]:
        """Bytes of one device's pieces, by part and memory kind: ``{"base": {"device": n}, ...}``.

        Exact: every split the rules make is even, so a piece is ``nbytes / ways``.
        """
        out: dict[str, dict[str, int]] = {}
        for part in TrainTree._fields:
            kinds = out.setdefault(part, {})
            for _, x, spec, kind in self.leaves(part):
                kinds[kind] = kinds.get(kind, 0) + _nbytes(x) // parallel.spec_ways(spec, mesh_shape)
        return out

    def quantized_base_bytes(self, mesh_shape: Mapping[str, int]) -> int:
        """One device's bytes of the base's QuantizedTensors (their codes and block constants)."""
        qts = [x for x in jax.tree.leaves(self.abstract.base, is_leaf=quant.is_quantized) if quant.is_quantized(x)]
        specs = [
            s for s in jax.tree.leaves(self.specs.base, is_leaf=quant.is_quantized) if quant.is_quantized(s)
        ]  # same order: the spec tree has the base's structure
        total = 0
        for qt, spec in zip(qts, specs, strict=True):
            for a, s in zip(
                jax.tree.leaves(qt), jax.tree.leaves(spec, is_leaf=lambda x: isinstance(x, P)), strict=True
            ):
                total += _nbytes(a) // parallel.spec_ways(s, mesh_shape)
        return total


def state_layout(
    model,
    optimizer: Optimizer,
    trainable: str = "lora",
    fsdp: int = 1,
    params_mode: str = "replicated",
    opt_mode: str = "replicated",
) -> StateLayout:
    """The abstract ``{base, params, opt_state}`` of training ``model`` with ``optimizer``, and the
    spec and memory kind of every leaf (``params_mode`` / ``opt_mode``: ``config.sharding``'s).

    ``trainable='full'`` trains the base itself (it must hold no 4-bit weight: uint8 codes have no
    gradient); its specs then follow ``params_mode`` like adapters do.
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}; got {trainable!r}")
    params, base = split_params(abstract_variables(model))
    if trainable == "full":
        stored = quantized_leaves(base)
        if stored:
            raise ValueError(
                f"trainable='full' needs a 16/32-bit base, but {len(stored)} of its weights are stored in 4 bits"
            )
        params, base = base, {}
    opt_state = optimizer.abstract_state(params)
    abstract = TrainTree(base, params, opt_state)
    specs = TrainTree(
        parallel.base_specs(base, fsdp),
        parallel.tree_specs(params, fsdp, params_mode, "config.sharding.params"),
        parallel.tree_specs(opt_state, fsdp, opt_mode, "config.sharding.opt_state"),
    )
    kinds = TrainTree(
        jax.tree.map(lambda _: "device", base),
        jax.tree.map(lambda _: "device", params),
        optimizer.memory_kinds(params, opt_state),
    )
    return StateLayout(abstract, specs, kinds, trainable)
