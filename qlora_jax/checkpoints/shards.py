"""Placing checkpoint tensors straight into their shards as they stream in.

``load_pretrained(..., mesh=mesh)`` puts every tensor on the devices that hold it under the base's
shardings (:func:`qlora_jax.parallel.base_specs`), one tensor at a time:

* a linear weight to be quantized is read **by rows**: each process reads from the safetensors
  file only the rows its devices hold (``safe_open(...).get_slice(name)[rows]``), places them
  row-split over ``fsdp``, and quantizes there under ``jit`` with the QuantizedTensor's shardings
  as outputs. The splits are block-aligned (whole rows, quantization blocks and nested blocks),
  so each device quantizes its own rows; the one global quantity, double quantization's mean
  offset, is a cross-device reduction whose result does not depend on the order
  (:func:`qlora_jax.quant.blockwise.accurate_mean`): the bytes equal a one-device quantize;
* a weight stored in 4 bits (a bitsandbytes checkpoint) is checked from its metadata and code
  tables, then each of its stored arrays (``packed``, ``absmax``, ``nested_absmax``; flat, so a
  device's rows are one contiguous byte range) is read as the pieces this process's devices hold:
  the stored bytes, never requantized;
* other tensors (embeddings, norms, ``lm_head``, biases) are read piece by piece as their spec
  splits them;
* a scanned layer stack ``[L, ...]`` is a buffer in its final shardings that each layer's pieces
  are written into (donated), so no device ever holds a stack twice.

No device then holds more than its final shards plus the tensor in flight. A tensor that does not
split (e.g. a 4-bit weight whose rows are not block-aligned over ``fsdp``) is replicated, and
every process reads it whole.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qlora_jax import quant


def row_sharding(qt_sharding: quant.QuantizedTensor) -> NamedSharding:
    """The sharding of the full-precision ``[out, in]`` weight that quantizes into ``qt_sharding``:
    rows over ``fsdp`` when the 4-bit tensor is split (its packed bytes are), else replicated."""
    packed = qt_sharding.packed
    split = packed.spec[-1] is not None if len(packed.spec) else False
    return NamedSharding(packed.mesh, P("fsdp", None) if split else P())


def read_placed(tensors, name: str, shape: tuple[int, ...], sharding: NamedSharding, dtype=None) -> jax.Array:
    """Tensor ``name`` as a global array with ``sharding``: each of this process's devices gets
    only its piece, read from the file as that piece (cast to ``dtype`` on the host if given)."""

    def piece(index):
        x = tensors.get_slice(name, index)
        if x.ndim != len(shape):  # stored with trailing unit axes (bitsandbytes' packed [n/2, 1])
            x = x.reshape(x.shape[: len(shape)])
        if dtype is None:
            return x
        # a value beyond the dtype's range becomes Inf, which the caller's finite check names
        with np.errstate(over="ignore"):
            return np.asarray(x).astype(dtype)

    return jax.make_array_from_callback(tuple(shape), sharding, piece)


def read_stored(tensors, name: str, layout: quant.QuantizedTensor, qt_sharding) -> quant.QuantizedTensor:
    """The stored 4-bit weight ``name`` (bitsandbytes' serialization, checked into ``layout`` by
    :func:`qlora_jax.quant.bnb_layout`) placed into ``qt_sharding``, each array read as this
    process's devices' pieces. A stored array whose shape is not its flat length plus unit axes
    (a layout no bitsandbytes writes, but one :func:`~qlora_jax.quant.from_bnb_state_dict`
    accepts) is read whole and cut."""
    fields = {}
    for field, suffix in quant.BNB_ARRAYS:
        abstract, sharding = getattr(layout, field), getattr(qt_sharding, field)
        if abstract is None:
            continue
        stored = tensors.shape(name + suffix)
        if stored[:1] == tuple(abstract.shape) and all(d == 1 for d in stored[1:]):
            fields[field] = read_placed(tensors, name + suffix, tuple(abstract.shape), sharding)
        else:
            fields[field] = place_host(np.asarray(tensors.get(name + suffix)).reshape(abstract.shape), sharding)
    if layout.offset is not None:
        fields["offset"] = place_host(layout.offset, qt_sharding.offset)
    return layout.replace(**fields)


@functools.cache
def _quantizer(storage, shardings_leaves, treedef):
    return jax.jit(storage.quantize, out_shardings=treedef.unflatten(shardings_leaves))


def quantize_placed(w: jax.Array, storage, qt_sharding: quant.QuantizedTensor) -> quant.QuantizedTensor:
    """Quantize the placed weight ``w`` on the devices holding it, into ``qt_sharding``."""
    leaves, treedef = jax.tree.flatten(qt_sharding)
    return _quantizer(storage, tuple(leaves), treedef)(w)


def place_host(value, sharding):
    """A host (numpy) value or tree onto ``sharding`` (a tree of NamedShardings of the same
    structure): each device gets its piece."""

    def put(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(put, value, sharding)


@functools.cache
def _empty(abstract_shapes, shardings, treedef):
    def make():
        return treedef.unflatten([jnp.zeros(s, d) for s, d in abstract_shapes])

    return jax.jit(make, out_shardings=treedef.unflatten(shardings))


def empty_stack(abstract, shardings):
    """Zeros of ``abstract``'s (stacked) layout, created in ``shardings`` (never whole on one device)."""
    leaves, treedef = jax.tree.flatten(abstract)
    shapes = tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves)
    return _empty(shapes, tuple(jax.tree.leaves(shardings)), treedef)()


@functools.cache
def _setter(shardings_leaves, treedef):
    def put(stack, layer, i):
        return jax.tree.map(lambda s, x: s.at[i].set(x.astype(s.dtype)), stack, layer)

    return jax.jit(put, donate_argnums=0, out_shardings=treedef.unflatten(shardings_leaves))


def set_layer(stack, layer, i: int, shardings):
    """``stack`` with layer ``i`` set to ``layer`` (same structure, no leading axis); ``stack`` is donated."""
    treedef = jax.tree.structure(stack)
    return _setter(tuple(jax.tree.leaves(shardings)), treedef)(stack, layer, jnp.int32(i))
