"""Pallas kernel: 4-bit dequantize (NF4/FP4/int4, plain or double-quantized absmax).

Terms: a *block* is a quantization block (``qt.block_size`` consecutive elements sharing one
absmax); a *tile* is the work of one kernel program (``blocks_per_tile`` blocks), done in *steps*
of ``blocks_per_step`` blocks. The packed tensor is viewed as ``[num_blocks, block_size / 2]``
bytes, so a tile is a row range and the output tile ``[blocks_per_tile, block_size]`` is
contiguous in the row-major result.

Bandwidth (issue 16): the output is 4x the input's bytes, so the kernel is a streaming copy with a
little arithmetic, and what limits it is how many bytes are in flight and how many instructions
each element costs:

* the code lookup is one load from a 16-entry float32 table (``lookup="table"``: the table is an
  input, 64 bytes that stay in L1), where the first version ran a 15-select tree on the code bits
  (``lookup="select"``, kept for comparison: ~20 instructions per element, ~13 on the integer
  pipe, against ~3 for an indexed load);
* a program loops over its tile in steps, so with ``num_stages > 1`` Triton software-pipelines the
  next step's loads under this step's arithmetic and stores (the first version ran one unpipelined
  tile per program);
* a step's bytes are whole rows of the contiguous ``[blocks, block/2]`` view, so each thread's
  loads and stores are runs of consecutive bytes that Triton can issue as 16-byte accesses.

Lowering constraints (Triton, checked from CPU by ``tests/kernels/test_lowering.py``): no gather
on *values*, but loads from refs at computed indices (the code table, the 256-entry dynamic map of
double quantization, the nested scales) are plain pointer loads and are allowed. The in-kernel
decode (code lookup, absmax, double quantization) is :mod:`qlora_jax.kernels._common`'s, which the
matmul kernels share.

The pure-jnp reference (:func:`dequantize_reference`) is :func:`qlora_jax.quant.dequantize`:
the test oracle and the fallback for shapes the kernel does not take (an element count that is
not a multiple of the block size, or fewer than 16 blocks). Both lookups give the same float32
value, so the kernel is bit-identical to the reference either way.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qlora_jax import quant
from qlora_jax.kernels._common import (
    OUT_DTYPES,
    PallasCall,
    code_table,
    dequantize_tile,
    double_quant_args,
    load_absmax,
    resolve_interpret,
)
from qlora_jax.kernels.dispatch import Dispatch, for_device

IMPLS = ("auto", "pallas", "mosaic_gpu", "xla")
LOOKUPS = ("table", "select")


@dataclasses.dataclass(frozen=True)
class DequantizeBlockSizes:
    """Tiling of the dequantize kernel.

    Attributes:
      blocks_per_tile: quantization blocks per program (this and the next two: powers of two).
        256 blocks of 64 codes = 16384 outputs (32 KiB of bf16) per program: 1024 programs for
        a 4096x4096 weight, ~8 per H100 SM, so every SM streams. Not yet measured on a GPU
        (tools/gpu_check.sh reports the fraction of copy bandwidth reached).
      blocks_per_step: blocks per pipelined step of a program's loop (2 KiB of codes in, 8 KiB
        of bf16 out at block 64 and 32 blocks).
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining stages of the step loop (1: no pipelining).
      lookup: ``"table"`` (indexed load from the 16-entry table) or ``"select"`` (select tree).
    """

    blocks_per_tile: int = 256
    blocks_per_step: int = 32
    num_warps: int = 4
    num_stages: int = 3
    lookup: str = "table"

    def __post_init__(self):
        for name in ("blocks_per_tile", "blocks_per_step", "num_warps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"DequantizeBlockSizes.{name} must be a positive power of two; got {v!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"DequantizeBlockSizes.num_stages must be a positive int; got {self.num_stages!r}")
        if self.lookup not in LOOKUPS:
            raise ValueError(f"DequantizeBlockSizes.lookup must be one of {LOOKUPS}; got {self.lookup!r}")


# --- The kernel ---------------------------------------------------------------------------------


def _dequantize_kernel(
    packed_ref, absmax_ref, *refs, quant_type, blocks_per_tile, blocks_per_step, nested_block_size, table, interpret
):
    refs = list(refs)
    o_ref = refs.pop()
    table_ref = refs.pop(0) if table else None
    dq_refs = tuple(refs)
    start = pl.program_id(0) * blocks_per_tile
    rows = jax.lax.broadcasted_iota(jnp.int32, (blocks_per_step, 1), 0)

    def step(s, carry):
        # the BlockSpec hands this program its own tile: index it locally. (Indexing it at the
        # global block number read past the tile on the GPU; Triton interpret mode clamps the
        # slice and hid it.)
        local = s * blocks_per_step
        absmax = load_absmax(
            absmax_ref, dq_refs, start + local + rows, nested_block_size=nested_block_size, interpret=interpret
        )  # [step, 1]
        packed = packed_ref[pl.ds(local, blocks_per_step), :]  # [step, block/2]
        o_ref[pl.ds(local, blocks_per_step), :] = dequantize_tile(packed, absmax, quant_type, o_ref.dtype, table_ref)
        return carry

    jax.lax.fori_loop(0, blocks_per_tile // blocks_per_step, step, 0)


def kernel_supports(qt: quant.QuantizedTensor) -> bool:
    """Whether the Pallas kernel takes this tensor (else :func:`dequantize` uses the reference)."""
    return qt.size % qt.block_size == 0 and qt.num_blocks >= 16


def _tile_blocks(num_blocks: int, wanted: int) -> int:
    """The largest power of two <= wanted that divides num_blocks (every tile full, no masks)."""
    tile = wanted
    while num_blocks % tile:
        tile //= 2
    return tile


def _dequantize_call(
    qt: quant.QuantizedTensor, dtype: str, block_sizes: DequantizeBlockSizes, interpret: bool
) -> PallasCall:
    nb, bs = qt.num_blocks, qt.block_size
    tile = _tile_blocks(nb, block_sizes.blocks_per_tile)
    step = min(block_sizes.blocks_per_step, tile)
    table = block_sizes.lookup == "table"
    args = (qt.packed.reshape(nb, bs // 2), qt.absmax, *((code_table(qt.quant_type),) if table else ()))
    args = (*args, *double_quant_args(qt))
    kernel = functools.partial(
        _dequantize_kernel,
        quant_type=qt.quant_type,
        blocks_per_tile=tile,
        blocks_per_step=step,
        nested_block_size=qt.nested_block_size,
        table=table,
        interpret=interpret,
    )
    params = dict(
        out_shape=jax.ShapeDtypeStruct((nb, bs), OUT_DTYPES[dtype]),
        grid=(nb // tile,),
        in_specs=[pl.BlockSpec((tile, bs // 2), lambda i: (i, 0))] + [pl.no_block_spec] * (len(args) - 1),
        out_specs=pl.BlockSpec((tile, bs), lambda i: (i, 0)),
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
        name=f"dequantize_{qt.quant_type}{'_dq' if qt.double_quant else ''}_{block_sizes.lookup}",
    )
    return PallasCall(kernel, args, params, finish=lambda y: y.reshape(qt.shape))


def dequantize_pallas(
    qt: quant.QuantizedTensor,
    dtype: str,
    *,
    block_sizes: DequantizeBlockSizes = DequantizeBlockSizes(),
    interpret: bool = False,
) -> jax.Array:
    """Run the kernel on a tensor it takes (:func:`kernel_supports`); ``dtype`` by name."""
    return _dequantize_call(qt, dtype, block_sizes, interpret)()


def dequantize(
    qt: quant.QuantizedTensor,
    dtype=jnp.bfloat16,
    *,
    impl: str | Dispatch = "auto",
    interpret: bool | None = None,
    block_sizes: DequantizeBlockSizes = DequantizeBlockSizes(),
) -> jax.Array:
    """Dequantize ``qt`` to ``dtype`` (values identical to :func:`dequantize_reference`).

    Args:
      qt: a :class:`qlora_jax.quant.QuantizedTensor`.
      dtype: float32, bfloat16 or float16.
      impl: a :class:`~qlora_jax.kernels.dispatch.Dispatch` (its ``dequantize`` for shapes that
        kernel takes, else the next that does: ``"mosaic_gpu"`` falls back to ``"pallas"``, then
        ``"xla"``); ``"auto"``, short for ``dispatch.for_device()`` resolved when called; or one
        impl by name, which raises for shapes it does not take: ``"pallas"`` (the Triton kernel),
        ``"mosaic_gpu"`` (the Hopper+ prototype of :mod:`qlora_jax.kernels.mosaic_gpu`;
        ``block_sizes`` does not apply) or ``"xla"`` (reference).
      interpret: run the kernel in interpret mode (CPU); ``None`` = on non-GPU backends.
      block_sizes: kernel tiling.
    """
    if not isinstance(impl, Dispatch) and impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} or a Dispatch; got {impl!r}")
    name = jnp.dtype(dtype).name
    if name not in OUT_DTYPES:
        raise ValueError(f"dtype must be one of {tuple(OUT_DTYPES)}; got {dtype!r}")
    if impl == "auto":
        impl = for_device()
    if isinstance(impl, Dispatch):
        impl = impl.dequantize
        if impl == "mosaic_gpu" and not _mosaic_gpu().kernel_supports(qt, name):
            impl = "pallas"
        if impl == "pallas" and not kernel_supports(qt):
            impl = "xla"
    if impl == "xla":
        return dequantize_reference(qt, name)
    if impl == "mosaic_gpu":  # raises, naming the rule, for a shape it does not take
        return _mosaic_gpu().dequantize_mosaic(qt, name, interpret=resolve_interpret(interpret))
    if not kernel_supports(qt):
        raise ValueError(
            f"the Pallas dequantize kernel needs a size that is a multiple of block_size and at least 16 "
            f"blocks; got shape {qt.shape} with block_size {qt.block_size}. Use impl='auto' or 'xla'."
        )
    return _dequantize_pallas_jit(qt, name, block_sizes, resolve_interpret(interpret))


def _mosaic_gpu():
    """The Mosaic GPU prototype, imported when first used: importing Mosaic GPU costs ~0.25 s."""
    from qlora_jax.kernels import mosaic_gpu

    return mosaic_gpu


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _dequantize_pallas_jit(qt, dtype, block_sizes, interpret):
    return dequantize_pallas(qt, dtype, block_sizes=block_sizes, interpret=interpret)


def dequantize_reference(qt: quant.QuantizedTensor, dtype=jnp.bfloat16) -> jax.Array:
    """Pure-jnp dequantize (the numerics core): the oracle and the CPU/fallback path."""
    return quant.dequantize(qt, dtype)
