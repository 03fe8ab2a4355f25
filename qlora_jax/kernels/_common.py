"""What the Pallas kernels share: the in-kernel 4-bit decode, their launch record, and constants.

Private to :mod:`qlora_jax.kernels`. Every kernel module and :mod:`~qlora_jax.kernels.dispatch`
import from here and from nothing else in the package, so none of them imports another to reach
a helper or a constant (the dispatch table once restated ``DECODE_MAX_M`` to avoid an import cycle).

In-kernel helpers (called inside a kernel body, on values and refs): :func:`lookup_4bit`,
:func:`load_absmax`, :func:`dequantize_tile`; their inputs are built outside by :func:`code_table`
and :func:`double_quant_args`. :class:`PallasCall` is a Triton kernel launch not yet made: the
library runs it as built, the tests rebuild it with a poisoned output aliased in
(``tests/kernel_config.py``).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qlora_jax import quant
from qlora_jax.quant import codebooks

DECODE_MAX_M = 16  # rows of x the decode kernel takes; larger M is a GEMM (qmatmul's tiled kernels)
OUT_DTYPES = types.MappingProxyType({"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16})


@dataclasses.dataclass(frozen=True)
class PallasCall:
    """``finish(pl.pallas_call(kernel, **params)(*args))``, held unlaunched.

    ``params`` are ``pl.pallas_call``'s keywords with ``in_specs`` a list, one spec per arg, so a
    caller can append an input (the tests' poisoned output buffer) and its alias.
    """

    kernel: Callable
    args: tuple
    params: dict[str, Any]
    finish: Callable[[jax.Array], jax.Array] = lambda y: y

    def __call__(self) -> jax.Array:
        return self.finish(pl.pallas_call(self.kernel, **self.params)(*self.args))


def resolve_interpret(interpret: bool | None) -> bool:
    """``None`` -> interpret exactly when the default backend cannot run Pallas GPU kernels."""
    if interpret is None:
        return jax.default_backend() != "gpu"
    return bool(interpret)


def code_table(quant_type: str) -> jax.Array:
    """The 16-entry float32 table a kernel indexes (an input ref, so the lookup is a cached load)."""
    return jnp.asarray(codebooks.table(quant_type), jnp.float32)


def lookup_4bit(codes: jax.Array, quant_type: str, table_ref=None) -> jax.Array:
    """float32 table values of 4-bit codes: ``table_ref[codes]`` (one indexed load per element)
    when the kernel was given :func:`code_table`, else a binary select tree on the code bits."""
    if table_ref is not None:
        return table_ref[codes.astype(jnp.int32)]
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


def dequantize_tile(packed: jax.Array, absmax: jax.Array, quant_type: str, dtype, table_ref=None) -> jax.Array:
    """``[rows, block/2]`` packed bytes x ``[rows, 1]`` absmax -> ``[rows, block]`` values in dtype."""
    hi = lookup_4bit(packed >> 4, quant_type, table_ref) * absmax
    lo = lookup_4bit(packed & 15, quant_type, table_ref) * absmax
    rows, half = packed.shape
    # even-index element in the high nibble: interleave (Triton: join + reshape, one store)
    return jnp.stack([hi, lo], axis=-1).reshape(rows, 2 * half).astype(dtype)
