"""Prototype (issue 16, item 6): the 4-bit dequantize kernel on Pallas' Mosaic GPU backend (Hopper+).

``dequantize_mosaic(qt, dtype)`` is bit-identical to :func:`qlora_jax.quant.dequantize` (the same
codes, absmax, double quantization and rounding as the Triton kernel in
:mod:`qlora_jax.kernels.dequantize`). ``kernels.dequantize(impl="mosaic_gpu")`` runs it, and a
dispatch entry may name it, but no committed one does: nothing here has run on a GPU yet.

Design. The packed bytes are viewed as ``[num_blocks, block_size / 2]``, one row per block.

* Entry point: ``plgpu.kernel`` (a ``pl.kernel``/``mpmd_map`` over a ``plgpu.Mesh``), a grid of one
  warpgroup per CTA over tiles of ``rows_per_tile`` rows. ``pl.pallas_call`` is not used: on jax
  0.11.2 nothing registers a Mosaic GPU lowering for it, so ``compiler_params=plgpu.CompilerParams()``
  fails to lower for CUDA with a bare ``AssertionError`` (``assert rule is not None``,
  ``jax/_src/pallas/pallas_call.py:925``), and its Mosaic GPU interpret mode takes only trivial
  BlockSpecs (``assert all(bm.has_trivial_window() ...)``): no grid of row tiles.
* Inside a CTA, ``plgpu.emit_pipeline`` streams ``[rows_per_step, cols_per_step]`` sub-tiles of
  packed bytes GMEM -> SMEM by TMA with ``num_stages`` in flight. The outputs are pipelined by hand
  (``num_stages`` SMEM buffers, ``copy_smem_to_gmem`` + ``wait_smem_to_gmem(num_stages - 1,
  wait_read_only=True)`` before a buffer is reused): emit_pipeline's own output path issues
  predicated TMA stores, which interpret mode rejects (``NotImplementedError: predicate not
  supported``).
* Code lookup: a depth-first binary select tree on the 4 code bits (15 selects and 4 bit tests per
  nibble, on uint32 codes). Mosaic GPU has no cheaper exact option here: a load from a small SMEM
  table at per-element indices fails to lower (``NotImplementedError: int_indexer_shape
  non-empty``), ``jnp.take`` too (``Unimplemented primitive ... gather``), ``lax.select_n`` takes only
  two cases, and shifts on uint8 are rejected (``Pointwise operations on 8-bit types are
  unsupported (except bitwise operations)``), hence the upcast. A byte-permute (``prmt``) lookup
  would need ``plgpu.inline_mgpu``, which interpret mode cannot run. This costs ~20 instructions
  per element against ~3 for the Triton kernel's indexed load: likely the bottleneck (unmeasured).
* Double quantization is fused: the tile's 8-bit absmax codes come in by TMA ahead of the packed
  stream and are decoded once per tile, at step 0 while the first sub-tiles load, in the
  warpgroup-strided layout (one code per thread at 128 rows): a 255-select tree over the 256-entry
  map, times the nested scale (a scalar load per nested block the tile spans, picked by iota),
  an optimization barrier (on GPU an empty inline asm that LLVM cannot contract an FMA across; in
  interpret mode it stops XLA's contraction: without it the tests fail), plus the offset. The
  float32 result goes to SMEM and each step reads its rows back in the WGMMA row layout
  (``plgpu.Layout.WGMMA.reduce(1)``), the one from which a per-row broadcast to ``[rows, cols]``
  lowers; without that hint layout inference fails ("Failed to infer a possible set of
  layouts"). ~4 selects per element at block 64.
* Output: Mosaic GPU cannot interleave two register arrays (``jnp.stack`` is unimplemented; a
  strided SMEM view fails in both the lowering and interpret mode), so a 16-bit result is packed as
  ``bits(even) | bits(odd) << 16`` in a uint32 word and the ``[blocks, block/2]`` u32 output is
  bitcast to ``[blocks, block]`` outside the kernel. float32 has no 64-bit word to use (x64 is
  off): the kernel writes two planes and XLA interleaves them, an extra pass over the output.

Constraints (:func:`kernel_supports`): a whole number of blocks, a multiple of 128 of them (the
strided-layout decode; tiles shrink from 256 to 128 to divide the count), ``block_size / 2``
divisible by the sub-tile's columns (true for every block size at the defaults); TMA wants every
GMEM stride but the last in 16-byte multiples (a row of ``block_size / 2`` bytes: block size >= 32,
always true) and at most 256 elements per box dimension (a tile's absmax takes one copy per 256);
rows per step a multiple of 64 (the WGMMA layout's row tile; columns are multiples of 8); the
sub-tile buffers must fit in the 227 KiB of SMEM (checked here and again by the lowering).

Checked on CPU (tests/kernels/test_mosaic_gpu.py):

* Mosaic GPU interpret mode (``plgpu.InterpretGPUParams``, public in
  ``jax.experimental.pallas.mosaic_gpu``): the kernel equals the reference bit for bit, for
  several CTAs, several sub-tiles per CTA and reused pipeline slots.
* The interpreter's safety net, verified in jax 0.11.2: unwritten output and SMEM start as NaN
  (floats) or all-ones (integers: a u32 word of two 16-bit NaNs), so an element the kernel skips
  fails the comparison. A register load out of a ref's bounds raises (``IndexError:
  Out-of-bounds read ...``), and so does a store (``ValueError: Out-of-bounds swap ...``). But TMA
  copies do what the hardware does, without raising: a ``copy_gmem_to_smem`` window past the end
  reads zeros, a ``copy_smem_to_gmem`` one is clipped. A wrong TMA window in this kernel therefore
  shows up as unwritten (NaN) or zero elements, not as an error. (Plain ``interpret=True`` clamps
  the slice instead, as with Triton.)
* ``jax.export`` with ``platforms=["cuda"]`` under an abstract H100 mesh works from a CPU jaxlib for
  ``plgpu.kernel`` kernels, with no disabled checks. It runs the Pallas -> Mosaic GPU lowering,
  layout inference, the Mosaic GPU dialect lowering (where unsupported layouts, TMA box and stride
  rules and the SMEM size are enforced) and MLIR verification, and emits a ``mosaic_gpu_v2``
  custom call holding the serialized module.

Not checked without a GPU: the passes after that (LLVM, PTX, SASS: they run in C++ when XLA
compiles on the device), that results match on hardware (flush-to-zero or contraction settings
the C++ pipeline picks; TMA and barrier ordering that the interpreter simulates), whether XLA
turns the u32 -> 16-bit bitcast into a no-op, and all performance: the tiling defaults are guesses.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from qlora_jax import quant
from qlora_jax.kernels._common import OUT_DTYPES
from qlora_jax.quant import codebooks

_WARPGROUP = 128  # threads in a Mosaic GPU warpgroup: the strided layout of the absmax decode needs multiples of it
_WGMMA_ROWS = 64  # the WGMMA register layout tiles rows by 64 and columns by 8
_TMA_MIN_BYTES = 16  # TMA: every GMEM stride but the last, and the box's minor extent, in 16-byte multiples
_TMA_MAX_BOX = 256  # TMA: at most 256 elements per box dimension
_MAX_TILE = 2048
# H100/H200 give a CTA at most 232448 bytes of SMEM (the lowering checks it); keep room for barriers.
_SMEM_BUDGET = 232448 - 4096


@dataclasses.dataclass(frozen=True)
class MosaicTiling:
    """Tiling of the Mosaic GPU dequantize kernel (all four: powers of two but ``num_stages``).

    The packed bytes are viewed as ``[num_blocks, block_size / 2]``: one row per quantization block.

    Attributes:
      rows_per_tile: blocks per CTA (one grid step): 128 to 2048. The double-quant absmax decode
        runs on the tile's codes in the warpgroup-strided layout, which needs a multiple of 128
        rows; the tile shrinks (not below 128) until it divides the block count. 256 blocks of 64
        are 1024 CTAs for a 4096x4096 weight, ~8 per H100 SM. Not measured on a GPU.
      rows_per_step: blocks per pipelined sub-tile: a multiple of 64 (the WGMMA register layout's
        row tile, which the per-row absmax broadcast needs), at most the tile.
      cols_per_step: packed bytes per sub-tile row: 16 (the TMA minimum) to 256 (the TMA box limit);
        ``block_size / 2`` when that is smaller.
      num_stages: sub-tiles in flight through SMEM in each direction (the input pipeline's
        ``max_concurrent_steps``, and as many output buffers draining by TMA).
    """

    rows_per_tile: int = 256
    rows_per_step: int = 64
    cols_per_step: int = 64
    num_stages: int = 3

    def __post_init__(self):
        for name in ("rows_per_tile", "rows_per_step", "cols_per_step"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"MosaicTiling.{name} must be a positive power of two; got {v!r}")
        if not _WARPGROUP <= self.rows_per_tile <= _MAX_TILE:
            raise ValueError(f"MosaicTiling.rows_per_tile must be in [128, {_MAX_TILE}]; got {self.rows_per_tile}")
        if not _WGMMA_ROWS <= self.rows_per_step <= min(self.rows_per_tile, _TMA_MAX_BOX):
            raise ValueError(
                f"MosaicTiling.rows_per_step must be in [64, min(rows_per_tile, 256)]; got {self.rows_per_step}"
            )
        if not _TMA_MIN_BYTES <= self.cols_per_step <= _TMA_MAX_BOX:
            raise ValueError(f"MosaicTiling.cols_per_step must be in [16, 256]; got {self.cols_per_step}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"MosaicTiling.num_stages must be a positive int; got {self.num_stages!r}")


def _select_tree(codes: jax.Array, table: np.ndarray) -> jax.Array:
    """float32 ``table[codes]`` for uint32 codes in ``[0, len(table))``, by selects on the code bits.

    Depth first (each half of the table resolved before the other) so only one partial result per
    level is alive: a breadth-first tree over the 256-entry map would hold 128 vectors at once.
    """
    nbits = len(table).bit_length() - 1
    bits = [(codes & np.uint32(1 << k)) != 0 for k in range(nbits)]

    def resolve(lo: int, level: int):
        if level < 0:
            return np.float32(table[lo])
        half = 1 << level
        return jnp.where(bits[level], resolve(lo + half, level - 1), resolve(lo, level - 1))

    return jnp.broadcast_to(resolve(0, nbits - 1), codes.shape)


def _bits16(x: jax.Array, dtype) -> jax.Array:
    return jax.lax.bitcast_convert_type(x.astype(dtype), jnp.uint16).astype(jnp.uint32)


def _kernel(*refs, quant_type, dtype, dq, nested_block_size, tile, step_rows, step_cols, num_stages, planar):
    refs = list(refs)
    packed_gmem, absmax_gmem = refs[:2]
    dq_gmem = refs[2:4] if dq else ()
    rest = refs[4 if dq else 2 :]
    out_gmem, absmax_smem, codes_smem, out_smem, barrier = rest
    half = packed_gmem.shape[1]
    row_steps, col_steps = tile // step_rows, half // step_cols
    t = jax.lax.axis_index("tiles")
    first = t * tile

    # The tile's absmax goes in ahead of the packed stream, so its decode overlaps the first loads.
    # One TMA box holds at most 256 elements: a larger tile takes several copies on one barrier.
    dst = codes_smem if dq else absmax_smem
    box = min(tile, _TMA_MAX_BOX)
    for c in range(tile // box):
        plgpu.copy_gmem_to_smem(absmax_gmem.at[pl.ds(first + c * box, box)], dst.at[pl.ds(c * box, box)], barrier.at[0])
    table4 = codebooks.table(quant_type)

    def decode_absmax():
        plgpu.barrier_wait(barrier.at[0])
        if not dq:
            return
        nested_gmem, offset_gmem = dq_gmem
        layout = plgpu.Layout.WG_STRIDED((tile,), 1)
        codes = plgpu.load(codes_smem, layout=layout).astype(jnp.uint32)
        values = _select_tree(codes, codebooks.DYNAMIC_SIGNED)
        if tile <= nested_block_size:  # the whole tile shares one nested scale
            nested = nested_gmem[first // nested_block_size]
        else:
            which = plgpu.broadcasted_iota(jnp.int32, (tile,), 0, layout=layout) // nested_block_size
            nested = nested_gmem[first // nested_block_size]
            for j in range(1, tile // nested_block_size):
                nested = jnp.where(which == j, nested_gmem[first // nested_block_size + j], nested)
        # product and sum rounded apart, as the reference (the barrier is opaque to FMA contraction)
        centred = jax.lax.optimization_barrier(values * nested)
        absmax_smem[...] = centred + offset_gmem[0]

    def body(indices, packed_smem):
        i, j = indices
        step = i * col_steps + j
        slot = jax.lax.rem(step, num_stages)

        @pl.when(step == 0)
        def _():
            decode_absmax()

        absmax = plgpu.load(absmax_smem.at[pl.ds(i * step_rows, step_rows)], layout=plgpu.Layout.WGMMA.reduce(1))
        absmax = jax.lax.broadcast_in_dim(absmax, (step_rows, step_cols), (0,))
        packed = plgpu.load(packed_smem, layout=plgpu.Layout.WGMMA).astype(jnp.uint32)
        hi = _select_tree(packed >> 4, table4) * absmax  # the even element sits in the high nibble
        lo = _select_tree(packed & np.uint32(15), table4) * absmax
        # this slot's previous TMA store must have read its SMEM before we overwrite it
        plgpu.wait_smem_to_gmem(num_stages - 1, wait_read_only=True)
        rows = pl.ds(first + i * step_rows, step_rows)
        cols = pl.ds(j * step_cols, step_cols)
        if planar:
            out_smem[slot, 0] = hi
            out_smem[slot, 1] = lo
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[slot], out_gmem.at[:, rows, cols])
        else:
            # a 16-bit pair in one 32-bit word, even element in the low half (little-endian order)
            out_smem[slot] = _bits16(hi, dtype) | (_bits16(lo, dtype) << 16)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[slot], out_gmem.at[rows, cols])

    plgpu.emit_pipeline(
        body,
        grid=(row_steps, col_steps),
        in_specs=[plgpu.BlockSpec((step_rows, step_cols), lambda i, j: (t * row_steps + i, j))],
        max_concurrent_steps=num_stages,
    )(packed_gmem)
    plgpu.wait_smem_to_gmem(0)


@dataclasses.dataclass(frozen=True)
class _Plan:
    tile: int  # blocks per CTA
    step_rows: int
    step_cols: int
    stages: int
    planar: bool  # float32: even and odd elements in two planes, interleaved by XLA afterwards

    def smem_bytes(self) -> int:
        out_bytes = 8 if self.planar else 4  # per packed byte: two f32, or one u32 word of two 16-bit values
        return self.stages * self.step_rows * self.step_cols * (1 + out_bytes) + self.tile * 5


def _plan(qt: quant.QuantizedTensor, tiling: MosaicTiling, dtype: str = "bfloat16") -> _Plan | None:
    """How the kernel tiles ``qt``, or None if it cannot (SMEM is checked separately)."""
    if not isinstance(qt, quant.QuantizedTensor) or np.ndim(qt.packed) != 1 or qt.size % qt.block_size:
        return None
    nb, half = qt.num_blocks, qt.block_size // 2
    tile = tiling.rows_per_tile
    while tile > _WARPGROUP and nb % tile:
        tile //= 2
    step_cols = min(tiling.cols_per_step, half)
    if nb % tile or half % step_cols or step_cols < _TMA_MIN_BYTES:
        return None
    step_rows = min(tiling.rows_per_step, tile)
    stages = min(tiling.num_stages, (tile // step_rows) * (half // step_cols))  # no more buffers than steps
    return _Plan(tile, step_rows, step_cols, stages, planar=dtype == "float32")


def kernel_supports(qt: quant.QuantizedTensor, dtype="bfloat16", tiling: MosaicTiling = MosaicTiling()) -> bool:
    """Whether :func:`dequantize_mosaic` takes ``qt`` (else use :func:`qlora_jax.quant.dequantize`).

    Needs: one tensor (no stacked leading axes), a whole number of blocks, a multiple of 128 of
    them, and ``block_size / 2`` a multiple of the sub-tile's columns: every block size the format
    allows passes that last test at the default tiling. The sub-tile buffers must fit in SMEM.
    """
    plan = _plan(qt, tiling, jnp.dtype(dtype).name)
    return plan is not None and plan.smem_bytes() <= _SMEM_BUDGET


def _interpret_params(interpret) -> plgpu.InterpretGPUParams | None:
    if isinstance(interpret, plgpu.InterpretGPUParams):
        return interpret
    if isinstance(interpret, bool):
        return plgpu.InterpretGPUParams() if interpret else None
    raise ValueError(f"interpret must be a bool or a plgpu.InterpretGPUParams; got {interpret!r}")


def dequantize_mosaic(
    qt: quant.QuantizedTensor,
    dtype="bfloat16",
    *,
    interpret: bool | plgpu.InterpretGPUParams = False,
    rows_per_tile: int = 256,
    rows_per_step: int = 64,
    cols_per_step: int = 64,
    num_stages: int = 3,
) -> jax.Array:
    """Dequantize ``qt`` with the Mosaic GPU kernel; bit-identical to ``quant.dequantize(qt, dtype)``.

    Args:
      qt: a :class:`qlora_jax.quant.QuantizedTensor` the kernel takes (:func:`kernel_supports`).
      dtype: bfloat16, float16 or float32.
      interpret: ``True`` (or a ``plgpu.InterpretGPUParams``) runs Mosaic GPU interpret mode, the
        only way on CPU; ``False`` compiles for a Hopper or newer GPU.
      rows_per_tile, rows_per_step, cols_per_step, num_stages: see :class:`MosaicTiling`.

    Raises:
      ValueError: for a shape the kernel does not take, a bad tiling, or sub-tiles too big for SMEM.
    """
    name = jnp.dtype(dtype).name
    if name not in OUT_DTYPES:
        raise ValueError(f"dtype must be one of {tuple(OUT_DTYPES)}; got {dtype!r}")
    if not isinstance(qt, quant.QuantizedTensor):
        raise ValueError(f"dequantize_mosaic expects a QuantizedTensor; got {type(qt).__name__}")
    tiling = MosaicTiling(rows_per_tile, rows_per_step, cols_per_step, num_stages)
    plan = _plan(qt, tiling, name)
    if plan is None:
        raise ValueError(
            f"the Mosaic GPU dequantize kernel needs one tensor with a whole number of blocks, a multiple of 128 "
            f"of them, and block_size / 2 a multiple of cols_per_step={cols_per_step} (or below it); got shape "
            f"{qt.shape} ({qt.size} elements, packed {tuple(qt.packed.shape)}) with block_size {qt.block_size}. "
            f"Use qlora_jax.quant.dequantize for it."
        )
    if plan.smem_bytes() > _SMEM_BUDGET:
        raise ValueError(
            f"the Mosaic GPU dequantize kernel's SMEM buffers take {plan.smem_bytes()} bytes at this tiling "
            f"({plan.stages} stages of {plan.step_rows}x{plan.step_cols} bytes, {name} out), over the "
            f"{_SMEM_BUDGET} available: lower num_stages, rows_per_step or cols_per_step."
        )
    return _dequantize_mosaic_jit(qt, name, plan, _interpret_params(interpret))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _dequantize_mosaic_jit(qt, dtype, plan: _Plan, interpret):
    nb, half = qt.num_blocks, qt.block_size // 2
    args = [qt.packed.reshape(nb, half), qt.absmax]
    if qt.double_quant:
        args += [qt.nested_absmax, qt.offset.reshape(1)]
    sub_tile = (plan.stages, plan.step_rows, plan.step_cols)
    if plan.planar:
        out_type = jax.ShapeDtypeStruct((2, nb, half), jnp.float32)
        out_smem = plgpu.SMEM((plan.stages, 2, *sub_tile[1:]), jnp.float32)
    else:
        out_type = jax.ShapeDtypeStruct((nb, half), jnp.uint32)
        out_smem = plgpu.SMEM(sub_tile, jnp.uint32)
    kernel = functools.partial(
        _kernel,
        quant_type=qt.quant_type,
        dtype=OUT_DTYPES[dtype],
        dq=qt.double_quant,
        nested_block_size=qt.nested_block_size,
        tile=plan.tile,
        step_rows=plan.step_rows,
        step_cols=plan.step_cols,
        num_stages=plan.stages,
        planar=plan.planar,
    )
    out = plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types=[
            plgpu.SMEM((plan.tile,), jnp.float32),  # the tile's float32 absmax
            plgpu.SMEM((plan.tile,), jnp.uint8),  # its 8-bit codes (double quant)
            out_smem,
            plgpu.Barrier(num_arrivals=max(1, plan.tile // _TMA_MAX_BOX), num_barriers=1),
        ],
        grid=(nb // plan.tile,),
        grid_names=("tiles",),
        compiler_params=plgpu.CompilerParams(),
        interpret=interpret,
        kernel_name=f"dequantize_mosaic_{qt.quant_type}{'_dq' if qt.double_quant else ''}_{dtype}",
    )(*args)
    if plan.planar:  # an XLA pass over the output: Mosaic GPU cannot interleave two f32 arrays in registers
        return jnp.stack([out[0], out[1]], axis=-1).reshape(qt.shape)
    # [nb, half] u32 -> [nb, half, 2] 16-bit, element 0 from the low half: the even element
    return jax.lax.bitcast_convert_type(out, OUT_DTYPES[dtype]).reshape(qt.shape)
