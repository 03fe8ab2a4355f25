"""Code tables ("codebooks") of the 4-bit and 8-bit data types, and their decision thresholds.

A 4-bit code is an index into a 16-entry float32 table in [-1, 1]; a value ``x`` of a block with
absolute maximum ``absmax`` is stored as the code whose table entry is nearest to
``x * (1 / absmax)`` and read back as ``table[code] * absmax``.

* **NF4** (NormalFloat, QLoRA §3): 16 quantiles of N(0, 1), asymmetric (7 negative, an exact 0,
  8 positive), normalised to ±1. :func:`derive_nf4` rebuilds it the way bitsandbytes does;
  :data:`NF4` is the canonical float32 table bitsandbytes hard-codes, and the one used.
* **FP4**: bitsandbytes' E2M1 variant: sign bit 3, magnitudes by the low three bits.
* **INT4**: symmetric integers ``-7..7`` over 7 (absmax scaling), for ablations. The code layout is
  bitsandbytes' ``get_4bit_type("int4")``: code ``c < 8`` is ``(7 - c) / 7``, code ``c >= 8`` is
  ``-(c - 8) / 7`` (codes 7 and 8 are both zero; quantization writes 7).
* **Dynamic 8-bit map** (Dettmers 2015): the signed 256-entry table that double quantization uses
  for the block constants (and, unsigned, 8-bit optimizers).

Thresholds decide the nearest code the way bitsandbytes' CUDA kernels do: an ascending list of
decision points ``t``; the sorted position of ``x`` is ``sum(x > t)`` (strict ``>``: a value exactly
on a threshold takes the lower code, and NaN takes position 0).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

QUANT_TYPES = ("nf4", "fp4", "int4")

# The canonical NF4 table, float32, identical in bitsandbytes' Python and CUDA sources.
NF4 = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)  # fmt: skip

# NF4 decision thresholds: the float32 literals of bitsandbytes' dQuantizeNF4 (kernels.cu).
NF4_THRESHOLDS = np.array(
    [
        -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
        -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
        0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
        0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
    ],
    dtype=np.float32,
)  # fmt: skip

# FP4 magnitudes by the low three code bits (bitsandbytes: 0, 0.0625, 8, 12, 4, 6, 2, 3, over 12).
_FP4_MAGNITUDES = np.array([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0], dtype=np.float32) / np.float32(12)
FP4 = np.concatenate([_FP4_MAGNITUDES, -_FP4_MAGNITUDES]).astype(np.float32)
FP4[8] = 0.0  # bnb's table stores +0.0 for code 8 (written as `-0` in its Python source)

# FP4 decision thresholds on |x|: the float32 literals of bitsandbytes' dQuantizeFP4. They sit
# between the magnitudes in ascending order 0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1 (0.583333 is
# bnb's rounding of 7/12, kept as the kernel has it).
FP4_THRESHOLDS = np.array(
    [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333], dtype=np.float32
)
# Magnitude code of the k-th smallest magnitude; equals k ^ ((k & 2) << 1).
FP4_MAGNITUDE_ORDER = np.array([0, 1, 6, 7, 4, 5, 2, 3], dtype=np.uint8)

INT4 = np.array([(7 - c) / 7 if c < 8 else -(c - 8) / 7 for c in range(16)], dtype=np.float32)


def exact_midpoint_thresholds(sorted_values: np.ndarray) -> np.ndarray:
    """float32 thresholds ``t`` with ``x > t  <=>  x > (a + b) / 2`` exactly, for float32 ``x``.

    The midpoint of two float32 values is exact in float64; rounding it *down* to float32 keeps
    the strict comparison exact (a float32 above the real midpoint is above its round-down). So
    ``sum(x > t)`` is the index of the nearest value, ties going to the lower one.
    """
    v = np.asarray(sorted_values, dtype=np.float64)
    if np.any(np.diff(v) < 0):
        raise ValueError("sorted_values must be in ascending order")
    mid = (v[:-1] + v[1:]) / 2
    t = mid.astype(np.float32)
    return np.where(t.astype(np.float64) > mid, np.nextafter(t, np.float32(-np.inf)), t).astype(np.float32)


INT4_THRESHOLDS = exact_midpoint_thresholds(np.unique(INT4))  # 15 distinct levels -7/7..7/7


def table(quant_type: str) -> np.ndarray:
    """The 16-entry float32 table of a 4-bit type (index = code)."""
    try:
        return {"nf4": NF4, "fp4": FP4, "int4": INT4}[quant_type]
    except KeyError:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}; got {quant_type!r}") from None


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=float32)`` bit for bit.

    torch's CPU kernel computes ``start + step * i`` for the first half and ``end - step * (steps
    - i - 1)`` for the rest with a fused multiply-add, all from float32 operands. The product of
    two float32 values is exact in float64, so one float64 add and one rounding emulates the FMA.
    """
    f32, f64 = np.float32, np.float64
    a, b = f32(start), f32(end)
    step = f32((b - a) / f32(steps - 1))
    i = np.arange(steps, dtype=f64)
    first = f64(a) + f64(step) * i
    second = f64(b) - f64(step) * (steps - i - 1)
    return np.where(i < steps // 2, first, second).astype(f32)


def derive_nf4(offset: float = 0.9677083) -> np.ndarray:
    """NF4 from its definition, as bitsandbytes' ``create_normal_map(offset, use_extra_value=True)``.

    The positive half takes 8 quantiles ``norm.ppf(linspace(offset, 0.5, 9)[:-1])``, the negative
    half 7 (``linspace(offset, 0.5, 8)``), plus an exact zero; sorted and divided by the maximum,
    so ±1 are exact. ``offset`` = (1 - 1/(2·15) + 1 - 1/(2·16)) / 2 makes the extreme quantiles
    finite. Computed in float32 like bnb, this reproduces :data:`NF4` exactly.
    """
    f32 = np.float32
    pos = norm.ppf(_torch_linspace_f32(offset, 0.5, 9)[:-1]).astype(f32)
    neg = (-norm.ppf(_torch_linspace_f32(offset, 0.5, 8)[:-1])).astype(f32)
    values = np.sort(np.concatenate([pos, [f32(0)], neg]).astype(f32))
    return (values / values.max()).astype(f32)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' dynamic ("dynamic tree") quantization map, sorted ascending, float32.

    Each value is a decimal exponent ``10**(-(max_exponent_bits-1) + i)`` times a linear fraction
    (means of ``linspace(0.1, 1)`` bins whose count doubles with ``i``), plus 0 and 1; the sign
    takes one bit when ``signed``. Unused entries (unsigned) are zeros, as in bnb. Computed in
    float32 exactly as ``bitsandbytes.functional.create_dynamic_map``.
    """
    f32 = np.float32
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    data: list[np.ndarray] = []

    def fraction_means(items: int) -> np.ndarray:
        b = _torch_linspace_f32(0.1, 1.0, items)
        return ((b[:-1] + b[1:]) / f32(2)).astype(f32)

    for i in range(max_exponent_bits):
        extra = 0 if signed else 1
        means = fraction_means(2 ** (i + non_sign_bits - max_exponent_bits + extra) + 1)
        scale = f32(10.0 ** (-(max_exponent_bits - 1) + i))
        data.append((scale * means).astype(f32))
        if signed:
            data.append((-scale * means).astype(f32))
    if additional_items > 0:
        means = fraction_means(additional_items + 1)
        scale = f32(10.0 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1))
        data.append((scale * means).astype(f32))
        if signed:
            data.append((-scale * means).astype(f32))
    values = np.concatenate([*data, np.array([0.0, 1.0], dtype=f32)])
    if values.size > 2**total_bits:
        raise ValueError(f"dynamic map has {values.size} values for {total_bits} bits")
    values = np.concatenate([values, np.zeros(2**total_bits - values.size, dtype=f32)])
    return np.sort(values).astype(f32)


DYNAMIC_SIGNED = dynamic_map(signed=True)
