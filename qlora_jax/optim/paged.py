"""``paged``: an optax wrapper that keeps optimizer moments in host memory between steps.

QLoRA's paged optimizers let large models train on small accelerators by moving Adam's moments
out of device memory (bitsandbytes uses CUDA unified memory). Here the paging is explicit, with
JAX memory kinds: the wrapped optimizer's per-parameter state leaves of at least ``min_size``
elements live in ``pinned_host`` memory between steps. Inside the jitted update they are brought
to the device one chunk (``chunk_bytes``) at a time, updated, and sent back.

How chunks work: the wrapped ``update`` runs once per chunk with the paged state of every other
chunk replaced by zeros. The outputs computed from those zeros are discarded, so XLA removes that
work as dead code; global quantities (``clip_by_global_norm``'s norm, step counts) come from the
device-resident gradients and small state, identical in every chunk. A chunk's host-to-device
transfer is ordered after the previous chunk's update (an optimization barrier). This requires
that the wrapped transform's large state is *per parameter* — subtrees shaped like ``params``
(Adam's ``mu``/``nu``, momentum traces), as in optax's optimizers; other state stays on device.

Numerics: with one chunk (the default ``chunk_bytes=None``) the update is the wrapped update,
bit for bit. Several chunks compile to different fusions, and XLA contracts multiply-adds into
FMAs differently across them: each step's update then equals the unchunked one to a few ulps
(measured; ``tests/optim/test_paged.py`` states the bound).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

HOST = "pinned_host"
DEVICE = "device"


class PagedState(NamedTuple):
    """The wrapped optimizer's state; its large per-parameter leaves are in ``pinned_host``."""

    inner: Any


def _leaf_shapes(tree) -> list[tuple]:
    return [tuple(np.shape(x)) for x in jax.tree.leaves(tree)]


def _map_per_param(fn, state, params_def, shapes):
    """Apply ``fn(param_index, leaf)`` to every leaf of the params-shaped subtrees of ``state``."""

    def params_like(node) -> bool:
        if not jax.tree.leaves(node) or jax.tree.structure(node) != params_def:
            return False
        return _leaf_shapes(node) == shapes

    def visit(node):
        if params_like(node):
            leaves = params_def.flatten_up_to(node)
            return params_def.unflatten([fn(i, leaf) for i, leaf in enumerate(leaves)])
        return node

    return jax.tree.map(visit, state, is_leaf=params_like)


def _chunks(nbytes: list[int], chunk_bytes: int | None) -> list[list[int]]:
    """Group the paged parameter indices (nbytes > 0), in order, into chunks of ~chunk_bytes."""
    paged = [i for i, b in enumerate(nbytes) if b]
    if chunk_bytes is None:
        return [paged] if paged else []
    chunks, current, size = [], [], 0
    for i in paged:
        if current and size + nbytes[i] > chunk_bytes:
            chunks.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes[i]
    return [*chunks, current] if current else chunks


def paged(
    inner: optax.GradientTransformation, min_size: int = 100_000, chunk_bytes: int | None = None
) -> optax.GradientTransformation:
    """Wrap ``inner`` so its large per-parameter state lives in host memory between steps.

    Args:
      inner: an optax transformation (chains with clipping included) whose large state is
        per parameter.
      min_size: state leaves with at least this many elements are paged (bitsandbytes pages
        tensors of >= 1e5 elements); smaller leaves and scalars stay on the device.
      chunk_bytes: paged state brought to the device at once, in bytes; ``None`` = all of it in
        one update (bit-identical to ``inner``). A parameter whose state is larger forms its
        own chunk.

    Returns:
      A ``GradientTransformation``. Call ``init`` outside ``jit`` (it places arrays);
      ``update`` inside ``jit`` (moving between memory kinds is a compiled operation).
    """
    if min_size < 1:
        raise ValueError(f"paged: min_size must be >= 1; got {min_size}")
    if chunk_bytes is not None and chunk_bytes < 1:
        raise ValueError(f"paged: chunk_bytes must be positive or None; got {chunk_bytes}")

    def is_large(leaf) -> bool:
        return hasattr(leaf, "shape") and int(np.prod(leaf.shape)) >= min_size

    def init_fn(params):
        state = inner.init(params)

        def to_host(_, leaf):
            if not is_large(leaf):
                return leaf
            return jax.device_put(leaf, leaf.sharding.with_memory_kind(HOST))

        return PagedState(_map_per_param(to_host, state, jax.tree.structure(params), _leaf_shapes(params)))

    def update_fn(updates, state, params=None):
        params_def, shapes = jax.tree.structure(updates), _leaf_shapes(updates)
        nbytes = [0] * len(shapes)

        def measure(i, leaf):
            if is_large(leaf):
                nbytes[i] += int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
            return leaf

        _map_per_param(measure, state.inner, params_def, shapes)
        chunks = _chunks(nbytes, chunk_bytes)
        if not chunks:
            new_updates, new_inner = inner.update(updates, state.inner, params)
            return new_updates, PagedState(new_inner)

        flat_updates: list[Any] = [None] * len(shapes)
        written: dict[tuple[int, int], jax.Array] = {}  # (param, k-th paged leaf) -> host array
        first_state = None
        barrier_on = None
        for c, chunk in enumerate(chunks):
            members = set(chunk)

            def fetch(i, leaf, members=members, barrier_on=barrier_on):
                if not (nbytes[i] and is_large(leaf)):
                    return leaf
                if i not in members:
                    return jnp.zeros(leaf.shape, leaf.dtype)  # outputs from it are dead code
                dev = jax.device_put(leaf, jax.memory.Space.Device)
                if barrier_on is not None:  # after the previous chunk's update
                    dev, _ = jax.lax.optimization_barrier((dev, barrier_on))
                return dev

            new_updates, new_state = inner.update(
                updates, _map_per_param(fetch, state.inner, params_def, shapes), params
            )
            chunk_updates = params_def.flatten_up_to(new_updates)
            for i in range(len(shapes)):
                if i in members or (c == 0 and not nbytes[i]):
                    flat_updates[i] = chunk_updates[i]
            if c == 0:
                first_state = new_state  # scalars and unpaged leaves: the same in every chunk
            finished = []
            counter: dict[int, int] = {}

            def send_back(i, leaf, members=members, finished=finished, counter=counter):
                if nbytes[i] and is_large(leaf) and i in members:
                    k = counter.get(i, 0)
                    counter[i] = k + 1
                    written[(i, k)] = jax.device_put(leaf, jax.memory.Space.Host)
                    finished.append(leaf)
                return leaf

            _map_per_param(send_back, new_state, params_def, shapes)
            barrier_on = finished

        counter: dict[int, int] = {}

        def assemble(i, leaf):
            if not (nbytes[i] and is_large(leaf)):
                return leaf
            k = counter.get(i, 0)
            counter[i] = k + 1
            return written[(i, k)]

        new_inner = _map_per_param(assemble, first_state, params_def, shapes)
        return params_def.unflatten(flat_updates), PagedState(new_inner)

    return optax.GradientTransformation(init_fn, update_fn)


def state_bytes_by_memory_kind(state) -> dict[str, int]:
    """Bytes of an optimizer state's arrays, by memory kind (``device``, ``pinned_host``)."""
    out: dict[str, int] = {}
    for leaf in jax.tree.leaves(state):
        if isinstance(leaf, jax.Array):
            kind = leaf.sharding.memory_kind or DEVICE
            out[kind] = out.get(kind, 0) + leaf.nbytes
    return out


def memory_report(inner: optax.GradientTransformation, params, **paged_kwargs) -> dict[str, dict]:
    """Optimizer-state bytes by memory kind and the compiled update's ``memory_analysis()``,
    for ``inner`` as it is and wrapped in :func:`paged` (``paged_kwargs``: min_size, chunk_bytes).

    On the CPU backend the analysis reports no host/device split (jax 0.11.2, measured): host
    and device memory are the same RAM there, and the ``memory_kind`` of the compiled
    executable's input and output shardings is what shows the paging.
    """
    grads = jax.tree.map(jnp.zeros_like, params)
    report = {}
    for name, tx in (("plain", inner), ("paged", paged(inner, **paged_kwargs))):
        state = tx.init(params)
        compiled = jax.jit(tx.update).lower(grads, state, params).compile()
        stats = compiled.memory_analysis()
        fields = ("argument", "output", "temp", "alias", "host_argument", "host_output", "host_temp")
        report[name] = {
            "state_bytes": state_bytes_by_memory_kind(state),
            "update": {f: int(getattr(stats, f"{f}_size_in_bytes")) for f in fields},
            "state_input_memory_kinds": sorted(
                {s.memory_kind for s in jax.tree.leaves(compiled.input_shardings[0][1])}
            ),
        }
    return report
