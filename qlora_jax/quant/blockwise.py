"""Block-wise absmax quantization, nibble packing and double quantization, in pure jnp.

These functions are the reference semantics of qlora_jax's 4-bit format — bitsandbytes'
``quantize_4bit`` as its CUDA kernels compute it — and the oracle every kernel is tested against.

Terms: a *block* is a run of ``block_size`` consecutive elements of the row-major flattened tensor
(the last block may be partial); *absmax* is the float32 ``max |x|`` of a block; a *code* is a
4-bit (or 8-bit) index into a table of :mod:`qlora_jax.quant.codebooks`.

Rules (bitsandbytes' CUDA kernels, ``csrc/kernels.cu``):

* Scale by the float32 reciprocal: ``x * (1 / absmax)``, not ``x / absmax``.
* Nearest code by the type's decision thresholds with strict ``>``: a value exactly on a
  threshold takes the lower code. NaN takes code 0.
* A block holding NaN or ±Inf gets a NaN absmax (:func:`absmax_of_blocks`), so it dequantizes to NaN
  in every element, on every backend and at every size (bitsandbytes' absmax is ``inf`` for an
  Inf block; the codes are the same).
* An all-zero block takes the code of an exact zero and dequantizes to exact zeros, with or
  without double quantization. (CUDA's ``0 * (1 / 0) = NaN`` gives NF4 code 0 instead, which
  double quantization turns into a nonzero value; see ``_reciprocal``.)
* Double quantization: ``offset = mean(absmax)``, then 8-bit dynamic-map codes of
  ``absmax - offset`` in blocks of ``nested_block_size`` with float32 block scales; reading back
  is ``table8[code] * nested_absmax + offset`` as two float32 operations (no fused multiply-add).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.quant import codebooks

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def num_blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def blocks_of(flat: jax.Array, block_size: int) -> jax.Array:
    """[n] -> [num_blocks, block_size], zero-padded (zeros never change a block's absmax)."""
    n = flat.shape[0]
    nb = num_blocks(n, block_size)
    return jnp.pad(flat, (0, nb * block_size - n)).reshape(nb, block_size)


def _count_above(x: jax.Array, thresholds: np.ndarray) -> jax.Array:
    """``sum(x > t)`` over ascending thresholds, as uint8: the sorted position of x's code.

    An unrolled compare-and-add fuses into one elementwise loop; for 16 codes it is cheaper than
    a search and lowers anywhere (no gather).
    """
    count = jnp.zeros(x.shape, jnp.uint8)
    for t in thresholds:
        count = count + (x > np.float32(t)).astype(jnp.uint8)
    return count


def absmax_of_blocks(blocks: jax.Array) -> jax.Array:
    """float32 ``max |x|`` over the last axis; NaN for a block holding NaN or ±Inf.

    ``jnp.max`` alone does not propagate NaN everywhere: XLA CPU's reduce-max dropped it in larger
    reductions (a 256x256 tensor with one NaN quantized to finite values; 100 elements kept it).
    The separate ``isfinite`` reduction fuses into the same pass.
    """
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    return jnp.where(jnp.all(jnp.isfinite(blocks), axis=-1), absmax, np.float32(np.nan))


def _reciprocal(absmax: jax.Array) -> jax.Array:
    """float32 ``1 / absmax``, and 0 for an all-zero block.

    CUDA computes ``1 / 0 = inf`` and ``0 * inf = NaN``, which picks code 0 (NF4: -1.0); with
    double quantization the block's absmax comes back as a small nonzero residue and the block
    dequantizes to ``-residue`` instead of zero. Scaling by 0 gives every element the code of an
    exact zero (bnb's CPU path does the same by clamping), so all-zero blocks stay exactly zero.
    This is the one place our quantizer departs from bitsandbytes' CUDA kernel; a NaN or Inf
    absmax still reaches every element of its block.
    """
    return jnp.where(absmax > 0, np.float32(1) / absmax, np.float32(0))


def encode_4bit(scaled: jax.Array, quant_type: str) -> jax.Array:
    """4-bit codes (uint8 in 0..15) of float32 values already scaled into [-1, 1]."""
    if quant_type == "nf4":
        return _count_above(scaled, codebooks.NF4_THRESHOLDS)
    if quant_type == "fp4":
        # Sign from x < 0 even when the magnitude rounds to 0 (tiny negatives -> code 8), as CUDA.
        k = _count_above(jnp.abs(scaled), codebooks.FP4_THRESHOLDS)
        magnitude = k ^ ((k & 2) << 1)  # == FP4_MAGNITUDE_ORDER[k]
        return jnp.where(scaled < 0, magnitude | 8, magnitude).astype(jnp.uint8)
    if quant_type == "int4":
        q = _count_above(scaled, codebooks.INT4_THRESHOLDS).astype(jnp.int32) - 7  # in -7..7
        return jnp.where(q >= 0, 7 - q, 8 - q).astype(jnp.uint8)
    raise ValueError(f"quant_type must be one of {codebooks.QUANT_TYPES}; got {quant_type!r}")


def pack_nibbles(codes: jax.Array) -> jax.Array:
    """[2m] uint8 codes -> [m] bytes, the even-index code in the high nibble (bnb's order)."""
    pairs = codes.reshape(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def _byte_table(table: np.ndarray) -> np.ndarray:
    """[256, 2] float32: the two values a packed byte holds, high nibble first."""
    return np.stack([np.repeat(table, 16), np.tile(table, 16)], axis=-1).astype(np.float32)


def unpack_values(packed: jax.Array, quant_type: str) -> jax.Array:
    """Packed bytes [m] -> table values [2m] float32.

    One lookup per byte in a 256x2 table: half the lookups of a per-code gather (measured ~10%
    faster on CPU, and codes are never materialized).
    """
    lut = jnp.asarray(_byte_table(codebooks.table(quant_type)))
    return lut.at[packed.astype(jnp.int32)].get(mode="promise_in_bounds").reshape(-1)


def unpack_nibbles(packed: jax.Array) -> jax.Array:
    """[m] bytes -> [2m] uint8 codes; inverse of :func:`pack_nibbles`."""
    return jnp.stack([packed >> 4, packed & 15], axis=-1).reshape(-1)


def quantize_4bit_blocks(x: jax.Array, quant_type: str, block_size: int) -> tuple[jax.Array, jax.Array]:
    """Quantize a tensor of any shape: returns (packed uint8 [ceil(n/2)], absmax float32 [nblocks]).

    An odd element count pads the last byte's low nibble with the code of a zero value.
    """
    flat = x.reshape(-1).astype(jnp.float32)
    n = flat.shape[0]
    blocks = blocks_of(flat, block_size)
    absmax = absmax_of_blocks(blocks)
    scaled = blocks * _reciprocal(absmax)[:, None]
    codes = encode_4bit(scaled, quant_type).reshape(-1)[: n + n % 2]
    return pack_nibbles(codes), absmax


def dequantize_4bit_blocks(
    packed: jax.Array, absmax: jax.Array, quant_type: str, block_size: int, n: int, dtype
) -> jax.Array:
    """Inverse of :func:`quantize_4bit_blocks`: [n] values ``dtype(table[code] * absmax)``."""
    values = unpack_values(packed, quant_type)[:n]
    nb = absmax.shape[0]
    scale = jnp.broadcast_to(absmax[:, None], (nb, block_size)).reshape(-1)[:n]
    return (values * scale).astype(dtype)


def quantize_blockwise_8bit(x: jax.Array, table: np.ndarray, block_size: int) -> tuple[jax.Array, jax.Array]:
    """8-bit block-wise quantization with the exact nearest code of an ascending 256-entry table.

    Returns (codes uint8 [n], absmax float32 [nblocks]). The decision thresholds are the table's
    exact midpoints (:func:`codebooks.exact_midpoint_thresholds`), so a tie takes the lower code.
    """
    thresholds = codebooks.exact_midpoint_thresholds(table)
    flat = x.reshape(-1).astype(jnp.float32)
    n = flat.shape[0]
    blocks = blocks_of(flat, block_size)
    absmax = absmax_of_blocks(blocks)
    scaled = blocks * _reciprocal(absmax)[:, None]
    codes = jnp.searchsorted(jnp.asarray(thresholds), scaled.reshape(-1), side="left")
    return codes[:n].astype(jnp.uint8), absmax


def dequantize_blockwise_8bit(codes: jax.Array, absmax: jax.Array, table: np.ndarray, block_size: int) -> jax.Array:
    """``table[code] * absmax[block]`` in float32, [n]."""
    n = codes.shape[0]
    values = jnp.asarray(table).at[codes.astype(jnp.int32)].get(mode="promise_in_bounds")
    nb = absmax.shape[0]
    scale = jnp.broadcast_to(absmax[:, None], (nb, block_size)).reshape(-1)[:n]
    return values * scale


def _split(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Veltkamp split of float32 ``a`` into two halves of at most 12 significant bits each."""
    c = jax.lax.optimization_barrier(a * np.float32(4097))  # barrier: no FMA across the split
    hi = c - (c - a)
    return hi, a - hi


def _two_product_error(a: jax.Array, b: jax.Array, p: jax.Array) -> jax.Array:
    """The exact rounding error ``a * b - p`` of the float32 product ``p = fl(a * b)`` (Dekker).

    Every partial product of the 12-bit halves is exact, so this holds whether or not XLA
    contracts the multiplies and adds into FMAs.
    """
    ah, al = _split(a)
    bh, bl = _split(b)
    return ((ah * bh - p) + ah * bl + al * bh) + al * bl


def accurate_mean(x: jax.Array) -> jax.Array:
    """The float32 mean of a 1-D float32 array, correctly rounded but for near-ties.

    A pairwise sum whose TwoSum rounding errors are carried beside it (Neumaier), then a
    division corrected by its exact remainder. The result does not depend on the reduction order
    XLA picks, so the double-quantization offset is reproducible on every backend and within an
    ulp of bitsandbytes' (torch's float32 cascade sum, then a division).
    """
    n = x.shape[0]
    size = 1 << max(0, math.ceil(math.log2(max(n, 1))))
    s = jnp.pad(x.astype(jnp.float32), (0, size - n))
    err = jnp.zeros_like(s)
    while s.shape[0] > 1:
        pairs = s.reshape(-1, 2)
        a, b = pairs[:, 0], pairs[:, 1]
        total = a + b
        b_virtual = total - a
        rounding = (a - (total - b_virtual)) + (b - b_virtual)
        err = err.reshape(-1, 2).sum(axis=1) + rounding
        s = total
    total, err = s[0], err[0]  # the sum is total + err, to about float32 precision squared
    count = jnp.float32(n)
    q = total / count
    p = jax.lax.optimization_barrier(q * count)
    remainder = (total - p) - _two_product_error(q, count, p) + err  # total - p is exact (Sterbenz)
    return q + remainder / count


def double_quantize(absmax: jax.Array, nested_block_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Quantize the float32 block constants: returns (codes uint8, nested_absmax float32, offset)."""
    offset = accurate_mean(absmax)
    codes, nested_absmax = quantize_blockwise_8bit(absmax - offset, codebooks.DYNAMIC_SIGNED, nested_block_size)
    return codes, nested_absmax, offset


def double_dequantize(
    codes: jax.Array, nested_absmax: jax.Array, offset: jax.Array, nested_block_size: int
) -> jax.Array:
    """The float32 block constants back from their 8-bit codes."""
    centred = dequantize_blockwise_8bit(codes, nested_absmax, codebooks.DYNAMIC_SIGNED, nested_block_size)
    # An optimization barrier between multiply and add keeps XLA from contracting them into an
    # FMA, which would round once where bitsandbytes rounds twice.
    return jax.lax.optimization_barrier(centred) + offset
