"""Pallas kernels: fused 4-bit dequantize·matmul ``y = x @ dequant(W).T`` and its backward.

``W`` is a :class:`~qlora_jax.quant.QuantizedTensor` in bitsandbytes' ``[out, in]`` (``[N, K]``)
layout, so the quantization blocks run along K. Each program computes an output tile
``[block_m, block_n]``; its K loop steps one quantization block at a time, dequantizing the
``[block_n, block_size]`` weight tile in registers (never written to HBM) and accumulating
``x_tile @ w_tile.T`` in float32. The backward pass ``dx = dy @ dequant(W)`` is the same idea on
the transposed product: a program owns ``dx[block_m, one quantization block of K]`` and loops
over N.

Terms: *block* = quantization block (``qt.block_size`` elements of K sharing an absmax);
*tile* = a kernel program's slice of an operand (``QMatmulBlockSizes``).

The in-kernel decode is the dequantize kernel's (:mod:`qlora_jax.kernels._common`): one load from
the 16-entry table per code. For decode-sized M (1…16) :mod:`qlora_jax.kernels.decode` has a
split-K kernel of its own (``impl="pallas_decode"``); these tiled kernels pad x to Triton's 16-row
minimum. Which of them :func:`qmatmul` runs is the ``impl`` it is given: a name, or a
:class:`~qlora_jax.kernels.dispatch.Dispatch` with a rule per range of M.

The frozen weight gets no gradient: :func:`qmatmul` is a ``jax.custom_vjp`` whose cotangent for
``qt`` is zero by design (float0 for its integer leaves). Its only residual is ``qt`` itself —
the backward pass dequantizes again rather than keeping a bf16 copy of the weight alive between
forward and backward. That is a deliberate trade: a kept copy would hold 3.88x the quantized
bytes per layer until its backward (86 MiB instead of 22 MiB for a 4096x11008 projection, 2 B
instead of 0.52 B per parameter: ``experiments/bench_kernels.py`` prints both), which for a 7B
model is the whole point of QLoRA lost; the price is one more dequantize per layer in the backward,
which the benchmark's backward rows time against a bf16 ``dy @ W`` that is handed the weight.
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
from qlora_jax.kernels import decode
from qlora_jax.kernels._common import (
    DECODE_MAX_M,
    PallasCall,
    code_table,
    dequantize_tile,
    double_quant_args,
    load_absmax,
    resolve_interpret,
)
from qlora_jax.kernels.dequantize import dequantize as dequantize_kernel
from qlora_jax.kernels.dispatch import Dispatch, for_device

IMPLS = ("auto", "pallas", "pallas_decode", "pallas_dequant", "xla")
KERNEL_BLOCK_SIZES = (32, 64, 128, 256)  # quantization block sizes the fused kernels take
KERNEL_X_DTYPES = ("bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class QMatmulBlockSizes:
    """Tiling of the fused kernels (each a power of two).

    Attributes:
      block_m: rows of x (tokens) per program; Triton's dot needs >= 16.
      block_n: output features per program (forward), and the N step of the backward loop.
      num_warps, num_stages: Triton launch parameters.
    """

    block_m: int = 16
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 4

    @classmethod
    def for_shape(cls, m: int, n: int) -> QMatmulBlockSizes:
        """Defaults meant for H100 (chosen from Triton practice, not yet tuned on one).

        Decode-sized M: narrow N tiles so a 4096-wide layer still launches 128 programs for 132
        SMs; larger M: square tiles that reuse each dequantized weight tile across more rows.
        """
        if m <= 16:
            sizes = cls(block_m=16, block_n=32, num_warps=4, num_stages=4)
        elif m <= 256:
            sizes = cls(block_m=64, block_n=64, num_warps=4, num_stages=3)
        else:
            sizes = cls(block_m=128, block_n=128, num_warps=8, num_stages=3)
        block_n = sizes.block_n
        while n % block_n:  # every N tile full: N is a multiple of 16 for the kernel
            block_n //= 2
        return dataclasses.replace(sizes, block_n=block_n)


def _block_ids(rows: jax.Array, blocks_per_row: int, kb) -> jax.Array:
    return rows * blocks_per_row + kb


def _load_weight_tile(packed_ref, absmax_ref, table_ref, dq_refs, row0, kb, *, block_n, qt_meta, dtype, interpret):
    """Dequantize ``W[row0:row0+block_n, kb*block:(kb+1)*block]`` -> ``[block_n, block]`` dtype."""
    quant_type, block_size, blocks_per_row, nested_block_size = qt_meta
    rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (block_n, 1), 0)
    absmax = load_absmax(
        absmax_ref,
        dq_refs,
        _block_ids(rows, blocks_per_row, kb),
        nested_block_size=nested_block_size,
        interpret=interpret,
    )  # [block_n, 1]
    packed = packed_ref[pl.ds(row0, block_n), pl.ds(kb * (block_size // 2), block_size // 2)]
    return dequantize_tile(packed, absmax, quant_type, dtype, table_ref)


def _qmatmul_fwd_kernel(x_ref, packed_ref, absmax_ref, table_ref, *refs, block_m, block_n, qt_meta, interpret):
    *dq_refs, o_ref = refs
    _, block_size, blocks_per_row, _ = qt_meta
    i, j = pl.program_id(0), pl.program_id(1)

    def body(kb, acc):
        w = _load_weight_tile(
            packed_ref,
            absmax_ref,
            table_ref,
            tuple(dq_refs),
            j * block_n,
            kb,
            block_n=block_n,
            qt_meta=qt_meta,
            dtype=x_ref.dtype,
            interpret=interpret,
        )  # [block_n, block]
        x = x_ref[pl.ds(i * block_m, block_m), pl.ds(kb * block_size, block_size)]  # [block_m, block]
        return acc + plgpu.dot(x, w, trans_b=True)  # fp32 accumulation

    acc = jax.lax.fori_loop(0, blocks_per_row, body, jnp.zeros((block_m, block_n), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _qmatmul_bwd_kernel(
    dy_ref, packed_ref, absmax_ref, table_ref, *refs, block_m, block_n, n_tiles, qt_meta, interpret
):
    *dq_refs, o_ref = refs
    _, block_size, _, _ = qt_meta
    i, kb = pl.program_id(0), pl.program_id(1)

    def body(t, acc):
        w = _load_weight_tile(
            packed_ref,
            absmax_ref,
            table_ref,
            tuple(dq_refs),
            t * block_n,
            kb,
            block_n=block_n,
            qt_meta=qt_meta,
            dtype=dy_ref.dtype,
            interpret=interpret,
        )  # [block_n, block]
        dy = dy_ref[pl.ds(i * block_m, block_m), pl.ds(t * block_n, block_n)]  # [block_m, block_n]
        return acc + plgpu.dot(dy, w)

    acc = jax.lax.fori_loop(0, n_tiles, body, jnp.zeros((block_m, block_size), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _weight_args(qt: quant.QuantizedTensor):
    n, k = qt.shape
    dq_args = double_quant_args(qt)
    meta = (qt.quant_type, qt.block_size, k // qt.block_size, qt.nested_block_size)
    return (qt.packed.reshape(n, k // 2), qt.absmax, code_table(qt.quant_type), *dq_args), meta


def _pad_rows(a: jax.Array, multiple: int) -> jax.Array:
    pad = (-a.shape[0]) % multiple
    return jnp.pad(a, ((0, pad), (0, 0))) if pad else a


def _compiler_params(bs: QMatmulBlockSizes):
    return plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)


def _tiled_call(kernel, act2d, qt, block_sizes, interpret, *, out_cols, tile_cols, name) -> PallasCall:
    """A fused kernel over row tiles of ``act2d`` (padded to ``block_m``) and column tiles of
    width ``tile_cols``; the padded rows are cut off the result."""
    m, bm = act2d.shape[0], block_sizes.block_m
    padded = _pad_rows(act2d, bm)
    w_args, meta = _weight_args(qt)
    args = (padded, *w_args)
    params = dict(
        out_shape=jax.ShapeDtypeStruct((padded.shape[0], out_cols), act2d.dtype),
        grid=(padded.shape[0] // bm, out_cols // tile_cols),
        in_specs=[pl.no_block_spec] * len(args),
        out_specs=pl.BlockSpec((bm, tile_cols), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=_compiler_params(block_sizes),
        name=f"{name}_{qt.quant_type}{'_dq' if qt.double_quant else ''}",
    )
    return PallasCall(functools.partial(kernel, qt_meta=meta, interpret=interpret), args, params, lambda y: y[:m])


def _fwd_call(x2d, qt, block_sizes: QMatmulBlockSizes, interpret: bool) -> PallasCall:
    bm, bn = block_sizes.block_m, block_sizes.block_n
    kernel = functools.partial(_qmatmul_fwd_kernel, block_m=bm, block_n=bn)
    return _tiled_call(kernel, x2d, qt, block_sizes, interpret, out_cols=qt.shape[0], tile_cols=bn, name="qmatmul_fwd")


def _bwd_call(dy2d, qt, block_sizes: QMatmulBlockSizes, interpret: bool) -> PallasCall:
    n, k = qt.shape
    bm, bn = block_sizes.block_m, block_sizes.block_n
    kernel = functools.partial(_qmatmul_bwd_kernel, block_m=bm, block_n=bn, n_tiles=n // bn)
    return _tiled_call(
        kernel, dy2d, qt, block_sizes, interpret, out_cols=k, tile_cols=qt.block_size, name="qmatmul_bwd"
    )


def qmatmul_fwd_pallas(x2d, qt, block_sizes: QMatmulBlockSizes, interpret: bool):
    """``[M, K] @ dequant(W[N, K]).T -> [M, N]`` in x's dtype."""
    return _fwd_call(x2d, qt, block_sizes, interpret)()


def qmatmul_bwd_pallas(dy2d, qt, block_sizes: QMatmulBlockSizes, interpret: bool):
    """``[M, N] @ dequant(W[N, K]) -> [M, K]`` in dy's dtype."""
    return _bwd_call(dy2d, qt, block_sizes, interpret)()


# --- Reference and the dispatching, differentiable public function ------------------------------


def qmatmul_reference(x: jax.Array, qt: quant.QuantizedTensor) -> jax.Array:
    """Pure jnp: ``x @ dequant(W).T`` with the weight dequantized to x's dtype, fp32 accumulation.

    XLA fuses the dequantize into one pass writing the weight once in x's dtype (no float32
    copy of the whole weight), then runs its own GEMM.
    """
    w = quant.dequantize(qt, x.dtype)  # [N, K]
    y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def _reference_bwd(dy2d, qt):
    w = quant.dequantize(qt, dy2d.dtype)
    return jnp.dot(dy2d, w, preferred_element_type=jnp.float32).astype(dy2d.dtype)


def kernel_supports(x_dtype, qt: quant.QuantizedTensor) -> bool:
    """Whether the fused kernels take this weight and activation dtype."""
    return (
        len(qt.shape) == 2
        and qt.block_size in KERNEL_BLOCK_SIZES
        and qt.shape[1] % qt.block_size == 0
        and qt.shape[0] % 16 == 0
        and jnp.dtype(x_dtype).name in KERNEL_X_DTYPES
    )


def _forward(impl, x2d, qt, block_sizes, interpret):
    if impl == "xla":
        return qmatmul_reference(x2d, qt)
    if impl == "pallas_decode":
        return decode.decode_matmul(x2d, qt, interpret=interpret)
    if impl == "pallas_dequant":
        w = dequantize_kernel(qt, x2d.dtype, impl="pallas", interpret=interpret)
        return jnp.dot(x2d, w.T, preferred_element_type=jnp.float32).astype(x2d.dtype)
    return qmatmul_fwd_pallas(x2d, qt, block_sizes or QMatmulBlockSizes.for_shape(x2d.shape[0], qt.shape[0]), interpret)


def _backward(impl, dy2d, qt, block_sizes, interpret):
    if impl in ("xla", "pallas_decode"):  # decode has no backward to speed up: M <= 16 is not training
        return _reference_bwd(dy2d, qt)
    if impl == "pallas_dequant":
        w = dequantize_kernel(qt, dy2d.dtype, impl="pallas", interpret=interpret)
        return jnp.dot(dy2d, w, preferred_element_type=jnp.float32).astype(dy2d.dtype)
    return qmatmul_bwd_pallas(
        dy2d, qt, block_sizes or QMatmulBlockSizes.for_shape(dy2d.shape[0], qt.shape[0]), interpret
    )


def _zero_cotangent(qt: quant.QuantizedTensor):
    def zero(a):
        if jnp.issubdtype(a.dtype, jnp.integer):
            return np.zeros(a.shape, dtype=jax.dtypes.float0)
        return jnp.zeros_like(a)

    return jax.tree.map(zero, qt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def _qmatmul(impl, x2d, qt, block_sizes, interpret):
    return _forward(impl, x2d, qt, block_sizes, interpret)


def _qmatmul_fwd(impl, x2d, qt, block_sizes, interpret):
    return _forward(impl, x2d, qt, block_sizes, interpret), qt  # residual: the 4-bit weight only


def _qmatmul_bwd(impl, block_sizes, interpret, qt, dy2d):
    return _backward(impl, dy2d, qt, block_sizes, interpret), _zero_cotangent(qt)


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def choose_impl(m: int, x_dtype, qt: quant.QuantizedTensor, dispatch: Dispatch | None = None) -> str:
    """The qmatmul implementation ``dispatch`` runs for ``m`` rows of ``x_dtype`` against ``qt``:
    its rule for ``m``, or the XLA path for shapes or dtypes the kernels do not take.
    ``dispatch=None``: :func:`~qlora_jax.kernels.dispatch.for_device` (the default device, now)."""
    if dispatch is None:
        dispatch = for_device()
    if not kernel_supports(x_dtype, qt):
        return "xla"
    impl = dispatch.qmatmul_impl(m)
    # a table's decode bound is at most DECODE_MAX_M, but M = 0 (an empty batch) is below its range
    return "xla" if impl == "pallas_decode" and not decode.kernel_supports(m, x_dtype, qt) else impl


def qmatmul(
    x: jax.Array,
    qt: quant.QuantizedTensor,
    *,
    impl: str | Dispatch = "auto",
    interpret: bool | None = None,
    block_sizes: QMatmulBlockSizes | None = None,
) -> jax.Array:
    """``x @ dequant(qt).T``: a linear layer on a 4-bit ``[out, in]`` weight. Differentiable in x.

    Args:
      x: activations ``[..., in]`` (bf16 or fp16 for the kernels; any float for "xla").
      qt: the frozen weight, a 2-D QuantizedTensor of shape ``[out, in]``.
      impl: a :class:`~qlora_jax.kernels.dispatch.Dispatch` (:func:`choose_impl`: its rule for this
        M, the XLA path for shapes the kernels do not take); ``"auto"``, short for
        ``dispatch.for_device()`` resolved when called (at trace time under ``jit``); or one impl
        by name, which raises for shapes it does not take: ``"pallas"`` (tiled fused kernels),
        ``"pallas_decode"`` (the split-K decode kernel of :mod:`qlora_jax.kernels.decode`,
        M <= 16; its backward is the XLA path), ``"pallas_dequant"`` (dequantize kernel + XLA GEMM)
        or ``"xla"`` (:func:`qmatmul_reference`).
      interpret: run Pallas kernels in interpret mode; ``None`` = on non-GPU backends.
      block_sizes: tiling of the fused kernels; default :meth:`QMatmulBlockSizes.for_shape`.

    Returns:
      ``[..., out]`` in x's dtype, accumulated in float32. ``jax.grad`` flows to ``x``; the
      weight's cotangent is zero by design (it is frozen).
    """
    if not isinstance(impl, Dispatch) and impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} or a Dispatch; got {impl!r}")
    if not isinstance(qt, quant.QuantizedTensor) or len(qt.shape) != 2:
        raise ValueError(f"qmatmul needs a 2-D QuantizedTensor [out, in]; got {getattr(qt, 'shape', type(qt))}")
    n, k = qt.shape
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"qmatmul: x's last dimension must equal the weight's in_features {k}; x has shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"qmatmul: x must be a float array; got {x.dtype}")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, k)
    if impl == "auto":
        impl = for_device()
    if isinstance(impl, Dispatch):
        impl = choose_impl(x2d.shape[0], x.dtype, qt, impl)
    elif impl == "pallas_decode" and not decode.kernel_supports(x2d.shape[0], x.dtype, qt):
        raise ValueError(
            f"impl='pallas_decode' takes 1..{DECODE_MAX_M} rows of x (all leading dimensions together) against a "
            f"weight the kernels take; got x {x.shape} ({x2d.shape[0]} rows) and weight {qt.shape} (block_size "
            f"{qt.block_size}). Use impl='auto', 'pallas' or 'xla'."
        )
    elif impl not in ("xla", "pallas_decode") and not kernel_supports(x.dtype, qt):
        raise ValueError(
            f"impl={impl!r} needs a 2-D weight with out_features % 16 == 0, in_features a multiple of a "
            f"block_size in {KERNEL_BLOCK_SIZES}, and x in {KERNEL_X_DTYPES}; got weight {qt.shape} "
            f"(block_size {qt.block_size}) and x {x.dtype}. Use impl='auto' or 'xla'."
        )
    interp = resolve_interpret(interpret)
    y = _qmatmul(impl, x2d, qt, block_sizes, interp)
    return y.reshape(*lead, n)
