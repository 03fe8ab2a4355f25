"""``QuantizedTensor``: the packed 4-bit tensor, and its public quantize/dequantize/bnb API."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.quant import blockwise, codebooks

_DTYPE_NAMES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@flax.struct.dataclass
class QuantizedTensor:
    """A tensor stored as block-wise absmax 4-bit codes, bitsandbytes' layout byte for byte.

    Layout (array fields, the pytree leaves):

    * ``packed`` — uint8 ``[ceil(n / 2)]``: the codes of the row-major flattened tensor, two per
      byte, the even-index element in the high nibble. An odd ``n`` pads the last low nibble with
      the code of a zero. (bitsandbytes stores the same bytes as ``[ceil(n / 2), 1]``.)
    * ``absmax`` — per quantization block of ``block_size`` elements: float32 ``max |x|``, or with
      double quantization uint8 codes into the signed 8-bit dynamic map.
    * ``nested_absmax`` — float32 ``[ceil(nblocks / nested_block_size)]``, double quant only.
    * ``offset`` — float32 scalar, the mean subtracted from ``absmax`` before double quant.

    Static fields (pytree metadata; part of the jit cache key, never traced): ``shape``,
    ``dtype`` (name of the original dtype, the default dequantize dtype), ``quant_type``
    (``"nf4" | "fp4" | "int4"``), ``block_size`` and ``nested_block_size`` (``None`` without
    double quant).

    Invariants: ``y = dequantize(quantize(x))`` has ``x``'s shape and dtype, and each element is
    the type's code value nearest to ``x / absmax`` (bitsandbytes' CUDA thresholds), times the
    block's absmax — so ``|y - x| <= max_gap / 2 * absmax`` with ``max_gap`` the largest gap of
    the code table (plus the absmax error of double quantization). Blocks whose elements are all
    zero dequantize to exact zeros. ``quantize(dequantize(qt))`` reproduces ``qt``'s codes.

    The layout is checked whenever one is built — by the constructor, ``replace``, orbax restore
    and every pytree unflatten: a wrong static field, a missing or extra double-quant field, or an
    array of the wrong dtype or length raises ``ValueError`` naming the field. Leading axes shared
    by every array (layers stacked for a scan) are allowed; trees of non-arrays (shardings, byte
    counts) and float0 cotangents are not checked.
    """

    packed: jax.Array
    absmax: jax.Array
    nested_absmax: jax.Array | None = None
    offset: jax.Array | None = None
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
    dtype: str = flax.struct.field(pytree_node=False, default="float32")
    quant_type: str = flax.struct.field(pytree_node=False, default="nf4")
    block_size: int = flax.struct.field(pytree_node=False, default=64)
    nested_block_size: int | None = flax.struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        _check_layout(self)

    @property
    def double_quant(self) -> bool:
        return self.nested_block_size is not None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def num_blocks(self) -> int:
        return blockwise.num_blocks(self.size, self.block_size)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays (packed codes and block constants).

        The code tables (64 B and 1 KiB) are constants of the type, not of the tensor, and are
        not counted; bitsandbytes' serialized form repeats them per tensor.
        """
        leaves = (self.packed, self.absmax, self.nested_absmax, self.offset)
        return int(sum(np.dtype(a.dtype).itemsize * int(np.prod(a.shape)) for a in leaves if a is not None))

    @property
    def bits_per_param(self) -> float:
        """Stored bits per element: ~4.5 for plain absmax at block 64, ~4.127 with double quant."""
        return 8 * self.nbytes / self.size


def _check_layout(qt: QuantizedTensor) -> None:
    """The invariants of the class docstring; see there for what is and is not checked."""
    _check_choice(qt.quant_type, codebooks.QUANT_TYPES, "QuantizedTensor.quant_type")
    _check_choice(qt.block_size, blockwise.BLOCK_SIZES, "QuantizedTensor.block_size")
    if qt.nested_block_size is not None:
        _check_choice(qt.nested_block_size, blockwise.NESTED_BLOCK_SIZES, "QuantizedTensor.nested_block_size")
    if qt.dtype not in _DTYPE_NAMES:
        raise ValueError(f"QuantizedTensor.dtype must be one of {tuple(_DTYPE_NAMES)}; got {qt.dtype!r}")
    shape = qt.shape
    if not isinstance(shape, tuple) or not all(isinstance(d, int | np.integer) and d > 0 for d in shape):
        raise ValueError(f"QuantizedTensor.shape must be a tuple of positive ints; got {shape!r}")

    def is_array(a) -> bool:
        return hasattr(a, "shape") and hasattr(a, "dtype")

    if not is_array(qt.packed) or not np.ndim(qt.packed):
        return  # a tree of shardings, sizes or sentinels with this structure, not a tensor
    dq = qt.nested_block_size is not None
    for field in ("absmax", "nested_absmax", "offset"):
        present = field == "absmax" or dq
        if is_array(getattr(qt, field)) != present:
            raise ValueError(
                f"QuantizedTensor.{field} must be {'an array' if present else 'None'} with nested_block_size="
                f"{qt.nested_block_size}; got {type(getattr(qt, field)).__name__}"
            )
    leaves = {f: getattr(qt, f) for f in ("packed", "absmax", "nested_absmax", "offset")}
    n = int(np.prod(shape, dtype=np.int64))
    nb = blockwise.num_blocks(n, qt.block_size)
    want = {"packed": (np.uint8, (n + 1) // 2), "absmax": (np.uint8 if dq else np.float32, nb)}
    if dq:
        want |= {"nested_absmax": (np.float32, blockwise.num_blocks(nb, qt.nested_block_size)), "offset": (np.float32,)}
    batch = tuple(qt.packed.shape[:-1])
    for field, (dtype, *length) in want.items():
        a = leaves[field]
        expected = (*batch, *length)
        got_dtype = np.dtype(a.dtype)
        if tuple(a.shape) != expected or (got_dtype != dtype and got_dtype != jax.dtypes.float0):
            what = f"{n} elements in blocks of {qt.block_size}" + (f", nested {qt.nested_block_size}" if dq else "")
            raise ValueError(
                f"QuantizedTensor.{field} should be {np.dtype(dtype).name}{list(expected)} for shape {list(shape)} "
                f"({what}); got {got_dtype.name}{list(a.shape)}"
            )


def is_quantized(x) -> bool:
    """Whether ``x`` is a :class:`QuantizedTensor`: the ``is_leaf`` for trees that hold 4-bit weights."""
    return isinstance(x, QuantizedTensor)


def _check_choice(value, allowed, what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {tuple(allowed)}; got {value!r}")


def _float_dtype_name(dtype, what: str) -> str:
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _DTYPE_NAMES:
        raise ValueError(f"{what} must be a float dtype, one of {tuple(_DTYPE_NAMES)}; got {dtype!r}")
    return name


def check_finite(x, name: str = "x") -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or ±Inf, saying how many and where.

    Call it outside ``jit`` (it reads values). :func:`quantize` calls it with
    ``check_finite=True``.
    """
    if isinstance(x, jax.core.Tracer):
        raise ValueError(
            f"check_finite({name}) needs concrete values, but {name} is traced inside jit: call "
            "qlora_jax.quant.check_finite outside the jitted function."
        )
    a = np.asarray(jax.device_get(x)).astype(np.float32)
    bad = ~np.isfinite(a)
    count = int(bad.sum())
    if count:
        first = [tuple(int(i) for i in idx) for idx in np.argwhere(bad)[:5]]
        raise ValueError(
            f"{name} has {count} non-finite values of {a.size} (NaN: {int(np.isnan(a).sum())}, "
            f"+Inf: {int(np.isposinf(a).sum())}, -Inf: {int(np.isneginf(a).sum())}); first at "
            f"indices {first}. A block holding one dequantizes to NaN in every element."
        )


_check_finite = check_finite  # quantize's `check_finite` flag shadows the function


def quantize(
    x,
    quant_type: str = "nf4",
    block_size: int = 64,
    double_quant: bool = True,
    nested_block_size: int = 256,
    *,
    check_finite: bool = False,
    name: str = "x",
) -> QuantizedTensor:
    """Quantize ``x`` block-wise to 4 bits, as bitsandbytes' ``quantize_4bit`` (CUDA rules).

    Args:
      x: float32, bfloat16 or float16 array of any non-empty shape. A linear weight is quantized
        in torch's ``[out_features, in_features]`` order (blocks run along ``in_features``).
      quant_type: ``"nf4"`` (QLoRA), ``"fp4"`` (bnb's E2M1) or ``"int4"`` (symmetric, ablations).
      block_size: elements per absmax block: 32, 64, ..., 4096.
      double_quant: quantize the float32 absmax again to 8 bits (QLoRA's double quantization).
      nested_block_size: block size of the second level: 64, ..., 4096 (bnb uses 256).
      check_finite: raise ``ValueError`` naming the count and position of NaN/Inf values
        first (needs concrete ``x``: not inside ``jit``). Without it non-finite values are not
        checked: a block holding NaN or ±Inf dequantizes to NaN in all its elements, and with
        double quantization the shared offset spreads NaN to every block.
      name: what to call ``x`` in error messages (e.g. the checkpoint tensor's name).

    Returns:
      A :class:`QuantizedTensor`. Works under ``jax.jit`` (the options are static).
    """
    _check_choice(quant_type, codebooks.QUANT_TYPES, "quant_type")
    _check_choice(block_size, blockwise.BLOCK_SIZES, "block_size")
    if double_quant:
        _check_choice(nested_block_size, blockwise.NESTED_BLOCK_SIZES, "nested_block_size")
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    dtype = _float_dtype_name(x.dtype, f"{name}.dtype")
    if int(np.prod(x.shape, dtype=np.int64)) == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): there is nothing to quantize")
    if check_finite:
        _check_finite(x, name)
    return _quantize(jnp.asarray(x), quant_type, block_size, nested_block_size if double_quant else None, dtype)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantize(x, quant_type, block_size, nested_block_size, dtype) -> QuantizedTensor:
    packed, absmax = blockwise.quantize_4bit_blocks(x, quant_type, block_size)
    nested_absmax = offset = None
    if nested_block_size is not None:
        absmax, nested_absmax, offset = blockwise.double_quantize(absmax, nested_block_size)
    return QuantizedTensor(
        packed=packed,
        absmax=absmax,
        nested_absmax=nested_absmax,
        offset=offset,
        shape=tuple(x.shape),
        dtype=dtype,
        quant_type=quant_type,
        block_size=block_size,
        nested_block_size=nested_block_size,
    )


def block_absmax(qt: QuantizedTensor) -> jax.Array:
    """The float32 absmax of every block (undoing double quantization if present)."""
    if not qt.double_quant:
        return qt.absmax
    return blockwise.double_dequantize(qt.absmax, qt.nested_absmax, qt.offset, qt.nested_block_size)


def dequantize(qt: QuantizedTensor, dtype=None) -> jax.Array:
    """Reconstruct the tensor: ``dtype(table[code] * absmax)``, shape ``qt.shape``.

    Args:
      qt: a :class:`QuantizedTensor`.
      dtype: float32, bfloat16 or float16; default the dtype ``qt`` was quantized from. The
        product is formed in float32 and rounded once (to nearest even), as bitsandbytes.
    """
    if not isinstance(qt, QuantizedTensor):
        raise ValueError(f"dequantize expects a QuantizedTensor; got {type(qt).__name__}")
    name = _float_dtype_name(qt.dtype if dtype is None else dtype, "dtype")
    return _dequantize(qt, name)


@functools.partial(jax.jit, static_argnums=(1,))
def _dequantize(qt: QuantizedTensor, dtype: str) -> jax.Array:
    flat = blockwise.dequantize_4bit_blocks(
        qt.packed, block_absmax(qt), qt.quant_type, qt.block_size, qt.size, _DTYPE_NAMES[dtype]
    )
    return flat.reshape(qt.shape)


# ---------------------------------------------------------------------------------------------
# bitsandbytes state dicts (what transformers + bitsandbytes save for a Linear4bit weight)


def to_bnb_state_dict(qt: QuantizedTensor, prefix: str = "weight") -> dict[str, np.ndarray]:
    """The tensors bitsandbytes serializes for this weight, keyed as ``Linear4bit`` saves them.

    Keys: ``{prefix}`` (packed uint8 ``[n/2, 1]``), ``{prefix}.absmax``, ``{prefix}.quant_map``,
    with double quant ``{prefix}.nested_absmax`` and ``{prefix}.nested_quant_map``, and
    ``{prefix}.quant_state.bitsandbytes__{nf4|fp4}`` (uint8 UTF-8 JSON of the static fields).
    int4 has no bitsandbytes serialization and raises ``ValueError``.
    """
    if qt.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"bitsandbytes serializes only quant_type 'nf4' or 'fp4'; this tensor is {qt.quant_type!r}")
    sd = {
        prefix: np.asarray(qt.packed).reshape(-1, 1),
        f"{prefix}.absmax": np.asarray(qt.absmax),
        f"{prefix}.quant_map": codebooks.table(qt.quant_type).copy(),
    }
    meta: dict[str, Any] = {
        "quant_type": qt.quant_type,
        "blocksize": qt.block_size,
        "dtype": qt.dtype,
        "shape": list(qt.shape),
    }
    if qt.double_quant:
        sd[f"{prefix}.nested_absmax"] = np.asarray(qt.nested_absmax)
        sd[f"{prefix}.nested_quant_map"] = codebooks.DYNAMIC_SIGNED.copy()
        meta.update(
            nested_blocksize=qt.nested_block_size,
            nested_dtype="float32",
            nested_offset=float(np.float32(qt.offset)),
        )
    # json.dumps with default separators, as bitsandbytes' pack_dict_to_tensor: byte-identical.
    sd[f"{prefix}.quant_state.bitsandbytes__{qt.quant_type}"] = np.frombuffer(
        json.dumps(meta).encode("utf-8"), dtype=np.uint8
    ).copy()
    return sd


BNB_ARRAYS = (("packed", ""), ("absmax", ".absmax"), ("nested_absmax", ".nested_absmax"))
"""The stored arrays of a bitsandbytes 4-bit weight: ``(QuantizedTensor field, key suffix)``."""


def _numpy(v) -> np.ndarray:
    return np.asarray(v.numpy() if hasattr(v, "numpy") and not isinstance(v, np.ndarray) else v)


def bnb_layout(sd: Mapping[str, Any], prefix: str = "weight") -> QuantizedTensor:
    """The :class:`QuantizedTensor` that bitsandbytes' serialized tensors ``sd`` hold, checked, with
    its stored arrays left abstract: ``packed``, ``absmax`` and ``nested_absmax`` are
    ``jax.ShapeDtypeStruct`` of their flat shapes; ``offset`` (read from the JSON) is concrete.

    The stored arrays (:data:`BNB_ARRAYS`) are checked by dtype and size alone, so ``sd`` may give
    them as ``jax.ShapeDtypeStruct``: a loader checks a weight from its metadata and code tables,
    then reads only the pieces of the arrays its devices hold
    (:mod:`qlora_jax.checkpoints.shards`). Raises ``ValueError`` as :func:`from_bnb_state_dict`.
    """

    def get(key: str, required: bool = True):
        if key not in sd:
            if required:
                near = sorted(k for k in sd if k.startswith(prefix))
                raise ValueError(f"bnb state dict has no key {key!r} (keys under {prefix!r}: {near})")
            return None
        v = sd[key]
        return v if isinstance(v, jax.ShapeDtypeStruct) else _numpy(v)

    state_keys = [k for k in sd if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
    if len(state_keys) != 1:
        raise ValueError(
            f"bnb state dict needs exactly one '{prefix}.quant_state.bitsandbytes__<type>' key; found {state_keys}"
        )
    state_key = state_keys[0]
    raw = get(state_key)
    try:
        meta = json.loads(raw.astype(np.uint8).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{state_key!r} does not hold UTF-8 JSON: {e}") from None
    for field in ("quant_type", "blocksize", "dtype", "shape"):
        if field not in meta:
            raise ValueError(f"{state_key!r} JSON lacks {field!r}: {meta}")
    quant_type = meta["quant_type"]
    _check_choice(quant_type, ("nf4", "fp4"), f"{state_key} quant_type")
    if not state_key.endswith(quant_type):
        raise ValueError(f"{state_key!r} names a type other than its JSON quant_type {quant_type!r}")
    block_size = int(meta["blocksize"])
    _check_choice(block_size, blockwise.BLOCK_SIZES, f"{state_key} blocksize")
    dtype = _float_dtype_name(meta["dtype"], f"{state_key} dtype")
    shape = tuple(int(s) for s in meta["shape"])
    n = int(np.prod(shape, dtype=np.int64))
    nb = blockwise.num_blocks(n, block_size)

    def expect(key, arr, dtype, size):
        if np.dtype(arr.dtype) != dtype or int(np.prod(arr.shape, dtype=np.int64)) != size:
            raise ValueError(f"{key!r} should be {np.dtype(dtype).name}[{size}]; got {arr.dtype}{list(arr.shape)}")
        return jax.ShapeDtypeStruct((size,), np.dtype(dtype))

    packed = expect(prefix, get(prefix), np.uint8, (n + 1) // 2)
    quant_map = get(f"{prefix}.quant_map")
    if not np.array_equal(quant_map, codebooks.table(quant_type)):
        raise ValueError(f"{prefix}.quant_map is not the canonical {quant_type} table: {quant_map.tolist()}")
    nested = "nested_blocksize" in meta
    absmax = expect(f"{prefix}.absmax", get(f"{prefix}.absmax"), np.uint8 if nested else np.float32, nb)
    nested_absmax = offset = nested_block_size = None
    if nested:
        nested_block_size = int(meta["nested_blocksize"])
        _check_choice(nested_block_size, blockwise.NESTED_BLOCK_SIZES, f"{state_key} nested_blocksize")
        if meta.get("nested_dtype", "float32") != "float32":
            raise ValueError(f"{state_key} nested_dtype must be 'float32'; got {meta['nested_dtype']!r}")
        nested_absmax = expect(
            f"{prefix}.nested_absmax",
            get(f"{prefix}.nested_absmax"),
            np.float32,
            blockwise.num_blocks(nb, nested_block_size),
        )
        nested_map = get(f"{prefix}.nested_quant_map")
        if not np.array_equal(nested_map, codebooks.DYNAMIC_SIGNED):
            raise ValueError(f"{prefix}.nested_quant_map is not bitsandbytes' signed dynamic map")
        offset = jnp.asarray(np.float32(meta["nested_offset"]))
    return QuantizedTensor(
        packed=packed,
        absmax=absmax,
        nested_absmax=nested_absmax,
        offset=offset,
        shape=shape,
        dtype=dtype,
        quant_type=quant_type,
        block_size=block_size,
        nested_block_size=nested_block_size,
    )


def from_bnb_state_dict(sd: Mapping[str, Any], prefix: str = "weight") -> QuantizedTensor:
    """Build a :class:`QuantizedTensor` from bitsandbytes' serialized tensors, without requantizing.

    ``sd`` maps key to array (numpy, jax, or anything ``np.asarray`` takes; torch tensors via
    ``.numpy()``). Raises ``ValueError`` naming the key when a tensor is missing, malformed, or
    holds a code table other than the canonical NF4/FP4/dynamic maps.
    """
    layout = bnb_layout(sd, prefix)
    present = [(f, s) for f, s in BNB_ARRAYS if getattr(layout, f) is not None]
    arrays = {f: jnp.asarray(_numpy(sd[prefix + s]).reshape(-1)) for f, s in present}
    return layout.replace(**arrays)


def bits_per_param(block_size: int = 64, double_quant: bool = True, nested_block_size: int = 256) -> float:
    """Stored bits per element of a large tensor, from the layout: 4-bit codes, plus per block an
    fp32 absmax (32 / block_size) or, with double quantization, a uint8 code (8 / block_size) plus
    an fp32 nested scale per ``nested_block_size`` blocks. NF4 + DQ at 64/256: 4 + 8/64 + 32/16384
    = 4.127 (the QLoRA paper's figure); without DQ 4.5. The one fp32 offset per tensor is not
    counted (it vanishes per element); :attr:`QuantizedTensor.bits_per_param` counts it.
    """
    if double_quant:
        return 4 + 8 / block_size + 32 / (block_size * nested_block_size)
    return 4 + 32 / block_size


def quantization_error(
    x, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = True, nested_block_size: int = 256
) -> dict[str, float]:
    """Quantize and dequantize ``x``; the error, measured in float64 on the host.

    Returns ``rel_mse`` = ‖x̂ − x‖² / ‖x‖², ``max_abs_err``, and the stored ``bits_per_param`` of
    the quantized tensor.
    """
    qt = quantize(x, quant_type, block_size, double_quant, nested_block_size)
    ref = np.asarray(jax.device_get(x), np.float64)
    err = np.asarray(jax.device_get(dequantize(qt, jnp.float32)), np.float64) - ref
    denom = float(np.sum(ref * ref))
    if denom == 0.0:
        raise ValueError("quantization_error: x is all zeros; the relative error is undefined")
    return {
        "rel_mse": float(np.sum(err * err)) / denom,
        "max_abs_err": float(np.max(np.abs(err))),
        "bits_per_param": qt.bits_per_param,
    }


def measure_error(x, qt: QuantizedTensor) -> dict[str, float]:
    """How well ``qt`` (quantized from ``x``) reproduces ``x``, block by block: one jitted pass.

    Returns ``block_rel_mse``, the mean over blocks (all-zero blocks left out) of
    ‖x̂_b − x_b‖² / ‖x_b‖² with x̂ = ``dequantize(qt)``, and ``block_rel_mse_exact_absmax``, the
    same with the codes scaled by the exact float32 absmax of ``x``'s blocks: equal without double
    quantization, far below it when double quantization is what went wrong. Per block, so one
    outlier cannot hide the damage it does to every other block (a whole-tensor ratio is
    dominated by the outlier's own energy). NaN when ``x`` is all zeros or not finite.
    :func:`quantization_error` is the whole-tensor float64 measure.
    """
    if tuple(np.shape(x)) != qt.shape:
        raise ValueError(f"measure_error: x has shape {tuple(np.shape(x))}; the tensor has {qt.shape}")
    err, err_exact = _measure_error(jnp.asarray(x), qt)
    return {"block_rel_mse": float(err), "block_rel_mse_exact_absmax": float(err_exact)}


@jax.jit
def _measure_error(x, qt: QuantizedTensor):
    flat = x.reshape(-1).astype(jnp.float32)
    blocks = blockwise.blocks_of(flat, qt.block_size)
    n = qt.size

    def per_block(absmax):
        y = blockwise.dequantize_4bit_blocks(qt.packed, absmax, qt.quant_type, qt.block_size, n, jnp.float32)
        err = blockwise.blocks_of(y - flat, qt.block_size)
        return jnp.sum(err * err, axis=1)

    energy = jnp.sum(blocks * blocks, axis=1)
    nonzero = energy > 0
    count = jnp.sum(nonzero)

    def mean_rel(sse):
        return jnp.sum(jnp.where(nonzero, sse / jnp.where(nonzero, energy, 1), 0)) / count

    return mean_rel(per_block(block_absmax(qt))), mean_rel(per_block(blockwise.absmax_of_blocks(blocks)))
