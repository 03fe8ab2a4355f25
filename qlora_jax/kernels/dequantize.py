"""Pallas kernel: 4-bit dequantize (NF4/FP4/int4, plain or double-quantized absmax).

Terms: a *block* is a quantization block (``qt.block_size`` consecutive elements sharing one
absmax); a *tile* is the work of one kernel program (``blocks_per_tile`` blocks). The packed
tensor is viewed as ``[num_blocks, block_size / 2]`` bytes, so a tile is a row range and the
output tile ``[blocks_per_tile, block_size]`` is contiguous in the row-major result.

Lowering constraints (Triton, checked from CPU by ``tests/kernels/test_lowering.py``): no gather
on values, so the 16-entry code table is a select tree on the code bits; loads from refs with
computed indices (the 256-entry dynamic map of double quantization, the nested scales) are
plain pointer loads and are allowed.

The pure-jnp reference (:func:`dequantize_reference`) is :func:`qlora_jax.quant.dequantize`:
the test oracle and the fallback for shapes the kernel does not take (an element count that is
not a multiple of the block size, or fewer than 16 blocks).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qlora_jax import quant
from qlora_jax.kernels import dispatch
from qlora_jax.quant import codebooks

IMPLS = ("auto", "pallas", "xla")
_OUT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class DequantizeBlockSizes:
    """Tiling of the dequantize kernel.

    Attributes:
      blocks_per_tile: quantization blocks per program (a power of two). 64 blocks of 64 codes
        = 4096 outputs (8 KiB in bf16) per program and 4096 programs for a 4096x4096 weight:
        chosen to keep every H100 SM streaming, not yet measured on one (tools/gpu_check.sh
        reports the achieved fraction of copy bandwidth).
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining stages (1: there is no loop to pipeline).
    """

    blocks_per_tile: int = 64
    num_warps: int = 4
    num_stages: int = 1


# --- In-kernel helpers, shared with qmatmul -----------------------------------------------------


def lookup_4bit(codes: jax.Array, quant_type: str) -> jax.Array:
    """float32 table values of 4-bit codes, by a binary select tree on the code bits (no gather)."""
    table = codebooks.table(quant_type)
    bits = [((codes >> k) & 1) == 1 for k in range(4)]
    layer = [np.float32(v) for v in table]
    for bit in bits:  # bit 0 picks between codes 2j and 2j+1, and so on up
        layer = [jnp.where(bit, layer[2 * j + 1], layer[2 * j]) for j in range(len(layer) // 2)]
    return layer[0]


def _mul_rn(a: jax.Array, b: jax.Array, *, interpret: bool) -> jax.Array:
    """``a * b`` rounded to float32 on its own, so a following add is not fused into an FMA.

    Double quantization's reference rounds the product and the sum separately (bitsandbytes
    does). Both compilers would contract them: XLA on CPU (interpret mode) and Triton on GPU. An
    optimization barrier stops XLA; on GPU an explicit ``mul.rn.f32`` is never contracted.
    """
    if interpret:
        return jax.lax.optimization_barrier(a * b)
    (out,) = plgpu.elementwise_inline_asm(
        "mul.rn.f32 $0, $1, $2;",
        args=[a.astype(jnp.float32), b.astype(jnp.float32)],
        constraints="=r,r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)],
    )
    return out


def double_quant_args(qt: quant.QuantizedTensor) -> tuple:
    """The kernel inputs :func:`load_absmax` reads as ``dq_refs`` (empty without double quant)."""
    if not qt.double_quant:
        return ()
    return (qt.nested_absmax, qt.offset.reshape(1), jnp.asarray(codebooks.DYNAMIC_SIGNED))


def load_absmax(absmax_ref, dq_refs, block_ids: jax.Array, *, nested_block_size, interpret: bool) -> jax.Array:
    """float32 absmax of the quantization blocks ``block_ids`` (any shape of int32 indices).

    With double quantization ``dq_refs = (nested_ref, offset_ref, table8_ref)`` and the value is
    ``table8[code] * nested[block // nested_block_size] + offset``, fused here.
    """
    raw = absmax_ref[block_ids]
    if not dq_refs:
        return raw
    nested_ref, offset_ref, table8_ref = dq_refs
    centred = _mul_rn(
        table8_ref[raw.astype(jnp.int32)], nested_ref[block_ids // nested_block_size], interpret=interpret
    )
    return centred + offset_ref[0]


def dequantize_tile(packed: jax.Array, absmax: jax.Array, quant_type: str, dtype) -> jax.Array:
    """``[rows, block/2]`` packed bytes x ``[rows, 1]`` absmax -> ``[rows, block]`` values in dtype."""
    hi = lookup_4bit(packed >> 4, quant_type) * absmax
    lo = lookup_4bit(packed & 15, quant_type) * absmax
    rows, half = packed.shape
    # even-index element in the high nibble: interleave (Triton: join + reshape, one store)
    return jnp.stack([hi, lo], axis=-1).reshape(rows, 2 * half).astype(dtype)


# --- The kernel ---------------------------------------------------------------------------------


def _dequantize_kernel(packed_ref, absmax_ref, *refs, quant_type, blocks_per_tile, nested_block_size, interpret):
    *dq_refs, o_ref = refs
    start = pl.program_id(0) * blocks_per_tile
    block_ids = start + jax.lax.broadcasted_iota(jnp.int32, (blocks_per_tile, 1), 0)
    absmax = load_absmax(
        absmax_ref, tuple(dq_refs), block_ids, nested_block_size=nested_block_size, interpret=interpret
    )  # [tile, 1]
    # the BlockSpec already hands this program its own tile: index it locally. (Indexing it at the
    # global `start` read past the tile on the GPU; interpret mode clamps the slice and hid it.)
    packed = packed_ref[...]  # [tile, block/2]
    o_ref[...] = dequantize_tile(packed, absmax, quant_type, o_ref.dtype)


def kernel_supports(qt: quant.QuantizedTensor) -> bool:
    """Whether the Pallas kernel takes this tensor (else :func:`dequantize` uses the reference)."""
    return qt.size % qt.block_size == 0 and qt.num_blocks >= 16


def _tile_blocks(num_blocks: int, wanted: int) -> int:
    """The largest power of two <= wanted that divides num_blocks (every tile full, no masks)."""
    tile = wanted
    while num_blocks % tile:
        tile //= 2
    return tile


def dequantize_pallas(
    qt: quant.QuantizedTensor,
    dtype: str,
    *,
    block_sizes: DequantizeBlockSizes = DequantizeBlockSizes(),
    interpret: bool = False,
    out: jax.Array | None = None,
) -> jax.Array:
    """Run the kernel. ``out`` (tests only): an initial output buffer the kernel writes into
    (aliased), so elements it fails to write keep their poison value."""
    nb, bs = qt.num_blocks, qt.block_size
    tile = _tile_blocks(nb, block_sizes.blocks_per_tile)
    args = (qt.packed.reshape(nb, bs // 2), qt.absmax, *double_quant_args(qt))
    out_shape = jax.ShapeDtypeStruct((nb, bs), _OUT_DTYPES[dtype])
    aliases = {}
    if out is not None:
        args = (*args, out.reshape(nb, bs))
        aliases = {len(args) - 1: 0}
    kernel = functools.partial(
        _dequantize_kernel,
        quant_type=qt.quant_type,
        blocks_per_tile=tile,
        nested_block_size=qt.nested_block_size,
        interpret=interpret,
    )
    if out is not None:  # the aliased buffer arrives as an extra input ref, before the output
        kernel = functools.partial(drop_alias_input, kernel)
    y = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(nb // tile,),
        in_specs=[pl.BlockSpec((tile, bs // 2), lambda i: (i, 0))] + [pl.no_block_spec] * (len(args) - 1),
        out_specs=pl.BlockSpec((tile, bs), lambda i: (i, 0)),
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
        name=f"dequantize_{qt.quant_type}{'_dq' if qt.double_quant else ''}",
    )(*args)
    return y.reshape(qt.shape)


def drop_alias_input(kernel, *refs):
    """Call ``kernel`` without the aliased poison buffer's input ref (it is the output's memory)."""
    *ins, _alias, o_ref = refs
    kernel(*ins, o_ref)


def resolve_interpret(interpret: bool | None) -> bool:
    """``None`` -> interpret exactly when the default backend cannot run Pallas GPU kernels."""
    if interpret is None:
        return jax.default_backend() != "gpu"
    return bool(interpret)


def dequantize(
    qt: quant.QuantizedTensor,
    dtype=jnp.bfloat16,
    *,
    impl: str = "auto",
    interpret: bool | None = None,
    block_sizes: DequantizeBlockSizes = DequantizeBlockSizes(),
) -> jax.Array:
    """Dequantize ``qt`` to ``dtype`` (values identical to :func:`dequantize_reference`).

    Args:
      qt: a :class:`qlora_jax.quant.QuantizedTensor`.
      dtype: float32, bfloat16 or float16.
      impl: ``"auto"`` (what :mod:`qlora_jax.kernels.dispatch` names for this device kind, for shapes
        the kernel takes; else the reference),
        ``"pallas"`` (the kernel; raises for shapes it does not take) or ``"xla"`` (reference).
      interpret: run the kernel in Pallas interpret mode (CPU); ``None`` = on non-GPU backends.
      block_sizes: kernel tiling.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    name = jnp.dtype(dtype).name
    if name not in _OUT_DTYPES:
        raise ValueError(f"dtype must be one of {tuple(_OUT_DTYPES)}; got {dtype!r}")
    if impl == "auto":  # the measured per-device table (kernels/dispatch.json); XLA where it has no entry
        impl = dispatch.dequantize_impl() if kernel_supports(qt) else "xla"
    if impl == "xla":
        return dequantize_reference(qt, name)
    if not kernel_supports(qt):
        raise ValueError(
            f"the Pallas dequantize kernel needs a size that is a multiple of block_size and at least 16 "
            f"blocks; got shape {qt.shape} with block_size {qt.block_size}. Use impl='auto' or 'xla'."
        )
    return _dequantize_pallas_jit(qt, name, block_sizes, resolve_interpret(interpret))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _dequantize_pallas_jit(qt, dtype, block_sizes, interpret):
    return dequantize_pallas(qt, dtype, block_sizes=block_sizes, interpret=interpret)


def dequantize_reference(qt: quant.QuantizedTensor, dtype=jnp.bfloat16) -> jax.Array:
    """Pure-jnp dequantize (the numerics core): the oracle and the CPU/fallback path."""
    return quant.dequantize(qt, dtype)
