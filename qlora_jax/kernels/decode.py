"""Pallas kernel for decode-sized products: ``y = x @ dequant(W).T`` for M = 1…16 rows of x.

At decode a 4-bit layer is a stream of weight bytes with a few multiply-adds per byte, so what
decides its speed is how many bytes are in flight, not the arithmetic (issue 16). The tiled fused
kernel (:mod:`qlora_jax.kernels.qmatmul`) pads x to 16 rows for Triton's dot and gives each
program a whole row of K for a ``[16, 32]`` output tile: at M = 1 it keeps about 1 KiB of weight in
flight per SM, far short of the 16–32 KiB that hide HBM latency. This kernel is built the other way:

* **split-K**: the grid is ``(N / block_n, splits)``; program ``(j, s)`` owns ``block_n`` output
  features and the ``s``-th run of K. Each writes float32 partial sums ``[splits, M, N]`` that XLA
  adds (a ``splits x M x N`` reduction: small beside the weight). ``splits`` is chosen so a layer
  launches about :data:`TARGET_PROGRAMS` programs (several per SM at once);
* **wide steps**: a loop step loads ``block_n x blocks_per_step`` quantization blocks of codes
  (8 KiB at the defaults, rows of 128 consecutive bytes: 16-byte loads), and Triton pipelines the
  next step's loads under this step's arithmetic (``num_stages``);
* **no padding of x**: the M rows are a Python loop over an accumulator each, with no dot (x is
  tiny; each dequantized weight tile is reused for every row from registers);
* **nested absmax fused**: double quantization's 8-bit absmax is decoded in the kernel, and the
  scale is applied once per quantization block (``sum_b absmax_b * sum_k table[code_k] x_k``)
  instead of once per element;
* **the codes' two nibbles are never interleaved**: the high nibble holds even elements of K, so
  it meets x's even elements (a stride-2 load of x) and the low nibble the odd ones.

The weight is used in float32 straight from the table and the absmax (the XLA path first rounds
it to x's dtype), with float32 accumulation, so the result differs from the reference by rounding
only; tests check it against a float64 product.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qlora_jax import quant
from qlora_jax.kernels._common import (
    DECODE_MAX_M,
    PallasCall,
    code_table,
    double_quant_args,
    load_absmax,
    lookup_4bit,
)

TARGET_PROGRAMS = 1024  # ~8 per SM on a 132-SM H100: enough resident programs to cover latency


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
    """Tiling of the decode kernel.

    Attributes:
      block_n: output features per program (a power of two, >= 16).
      blocks_per_step: quantization blocks of K per loop step (a power of two).
      splits: programs along K; ``None``: :meth:`for_shape` picks it from :data:`TARGET_PROGRAMS`.
      num_warps, num_stages: Triton launch parameters.
    """

    block_n: int = 64
    blocks_per_step: int = 4
    splits: int | None = None
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_n", "blocks_per_step", "num_warps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"DecodeBlockSizes.{name} must be a positive power of two; got {v!r}")
        if self.block_n < 16:
            raise ValueError(f"DecodeBlockSizes.block_n must be >= 16; got {self.block_n}")
        if self.splits is not None and (not isinstance(self.splits, int) or self.splits < 1):
            raise ValueError(f"DecodeBlockSizes.splits must be a positive int or None; got {self.splits!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"DecodeBlockSizes.num_stages must be a positive int; got {self.num_stages!r}")

    def for_shape(self, n: int, k: int, block_size: int) -> DecodeBlockSizes:
        """This tiling fitted to a ``[n, k]`` weight: ``block_n`` and ``blocks_per_step`` shrunk to
        divide it, and ``splits`` (when ``None``) the fewest reaching :data:`TARGET_PROGRAMS`
        programs while every split keeps at least two steps to pipeline."""
        block_n = self.block_n
        while n % block_n:
            block_n //= 2
        blocks_per_row = k // block_size
        bps = self.blocks_per_step
        while blocks_per_row % bps:
            bps //= 2
        steps = blocks_per_row // bps
        splits = self.splits
        if splits is None:
            splits = max(1, min(math.ceil(TARGET_PROGRAMS / (n // block_n)), steps // 2))
        splits = min(splits, steps)
        splits = math.ceil(steps / math.ceil(steps / splits))  # no split left empty
        return dataclasses.replace(self, block_n=block_n, blocks_per_step=bps, splits=splits)


def _decode_kernel(x_ref, packed_ref, absmax_ref, table_ref, *refs, m, sizes, steps, qt_meta, interpret):
    *dq_refs, o_ref = refs
    quant_type, block_size, blocks_per_row, nested_block_size = qt_meta
    bn, bps, half = sizes.block_n, sizes.blocks_per_step, block_size // 2
    j, s = pl.program_id(0), pl.program_id(1)
    row0 = j * bn
    steps_per_split = math.ceil(steps / sizes.splits)
    first = s * steps_per_split
    rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (bn, 1), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (1, bps), 1)

    def body(t, accs):
        kb0 = t * bps  # first quantization block of K in this step
        packed = packed_ref[pl.ds(row0, bn), pl.ds(kb0 * half, bps * half)].reshape(bn, bps, half)
        absmax = load_absmax(
            absmax_ref,
            tuple(dq_refs),
            rows * blocks_per_row + kb0 + cols,
            nested_block_size=nested_block_size,
            interpret=interpret,
        )  # [bn, bps]
        hi = lookup_4bit(packed >> 4, quant_type, table_ref)  # element 2i of each byte's pair
        lo = lookup_4bit(packed & 15, quant_type, table_ref)  # element 2i + 1
        out = []
        for r in range(m):
            k0 = kb0 * block_size
            # (a [1, n] slice, not x_ref[r, ...]: interpret mode's discharge rejects an int index
            # beside a strided slice)
            x_even = x_ref[pl.ds(r, 1), pl.ds(k0, bps * half, stride=2)].astype(jnp.float32).reshape(1, bps, half)
            x_odd = x_ref[pl.ds(r, 1), pl.ds(k0 + 1, bps * half, stride=2)].astype(jnp.float32).reshape(1, bps, half)
            per_block = jnp.sum(hi * x_even + lo * x_odd, axis=2)  # [bn, bps]
            out.append(accs[r] + jnp.sum(per_block * absmax, axis=1))
        return tuple(out)

    last = jnp.minimum(first + steps_per_split, steps)
    zeros = tuple(jnp.zeros((bn,), jnp.float32) for _ in range(m))
    accs = jax.lax.fori_loop(first, last, body, zeros)
    for r in range(m):
        o_ref[s, r, pl.ds(row0, bn)] = accs[r]


def kernel_supports(m: int, x_dtype, qt: quant.QuantizedTensor) -> bool:
    """Whether the decode kernel takes ``m`` rows of ``x_dtype`` against this weight."""
    return (
        1 <= m <= DECODE_MAX_M
        and len(qt.shape) == 2
        and qt.shape[0] % 16 == 0
        and qt.shape[1] % qt.block_size == 0
        and qt.block_size in (32, 64, 128, 256)
        and jnp.dtype(x_dtype).name in ("bfloat16", "float16", "float32")
    )


def _decode_call(
    x2d: jax.Array, qt: quant.QuantizedTensor, block_sizes: DecodeBlockSizes, interpret: bool
) -> PallasCall:
    m, k = x2d.shape
    n = qt.shape[0]
    if not kernel_supports(m, x2d.dtype, qt) or k != qt.shape[1]:
        raise ValueError(
            f"the decode kernel takes 1..{DECODE_MAX_M} rows of bf16/fp16/fp32 x against a 2-D weight with "
            f"out_features % 16 == 0 and in_features a multiple of its block_size in (32, 64, 128, 256); got x "
            f"{x2d.shape} {x2d.dtype} and weight {qt.shape} (block_size {qt.block_size})"
        )
    sizes = block_sizes.for_shape(n, k, qt.block_size)
    steps = k // qt.block_size // sizes.blocks_per_step
    meta = (qt.quant_type, qt.block_size, k // qt.block_size, qt.nested_block_size)
    args = (x2d, qt.packed.reshape(n, k // 2), qt.absmax, code_table(qt.quant_type), *double_quant_args(qt))
    kernel = functools.partial(_decode_kernel, m=m, sizes=sizes, steps=steps, qt_meta=meta, interpret=interpret)
    params = dict(
        out_shape=jax.ShapeDtypeStruct((sizes.splits, m, n), jnp.float32),
        grid=(n // sizes.block_n, sizes.splits),
        in_specs=[pl.no_block_spec] * len(args),
        out_specs=pl.no_block_spec,
        interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=sizes.num_warps, num_stages=sizes.num_stages),
        name=f"qmatmul_decode_{qt.quant_type}{'_dq' if qt.double_quant else ''}",
    )
    return PallasCall(kernel, args, params)


def decode_partials(
    x2d: jax.Array,
    qt: quant.QuantizedTensor,
    block_sizes: DecodeBlockSizes = DecodeBlockSizes(),
    *,
    interpret: bool = False,
) -> jax.Array:
    """The kernel's float32 partial sums ``[splits, M, N]`` (their sum over axis 0 is ``x @ W.T``)."""
    return _decode_call(x2d, qt, block_sizes, interpret)()


def decode_matmul(
    x2d: jax.Array, qt: quant.QuantizedTensor, block_sizes: DecodeBlockSizes = DecodeBlockSizes(), *, interpret=False
) -> jax.Array:
    """``[M, K] @ dequant(W[N, K]).T -> [M, N]`` in x's dtype, M <= :data:`DECODE_MAX_M`."""
    partials = decode_partials(x2d, qt, block_sizes, interpret=interpret)
    return partials.sum(axis=0).astype(x2d.dtype)
