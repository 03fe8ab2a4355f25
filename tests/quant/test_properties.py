"""Property tests (hypothesis): error bounds, scale invariance and idempotence over random shapes,
scales, block sizes and types."""

import hypothesis.extra.numpy as hnp
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_jax import quant
from qlora_jax.quant import codebooks

f32 = np.float32
QUANT_TYPES = st.sampled_from(["nf4", "fp4", "int4"])
BLOCK_SIZES = st.sampled_from([32, 64, 128, 256])

# Few examples with small shapes: every new shape/option set costs an XLA compile (~0.1 s).
PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tensors(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=40))
    n = int(np.prod(shape))
    seed = draw(st.integers(0, 2**32 - 1))
    # log-uniform scales over 10 decades, kept inside float32's normal range so that 1/absmax is
    # not subnormal (documented limit)
    scale = 10.0 ** draw(st.floats(-5, 5))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) * scale
    if draw(st.booleans()):
        x[rng.random(n) < 0.3] = 0.0  # exact zeros and, sometimes, whole zero blocks
    return x.astype(f32).reshape(shape)


def _max_half_gap(quant_type):
    values = np.unique(codebooks.table(quant_type).astype(np.float64))
    return np.diff(values).max() / 2


@PROPERTY_SETTINGS
@given(x=tensors(), quant_type=QUANT_TYPES, block_size=BLOCK_SIZES)
def test_error_bounded_by_half_largest_gap_times_absmax(x, quant_type, block_size):
    qt = quant.quantize(x, quant_type, block_size, double_quant=False)
    y = np.asarray(quant.dequantize(qt, jnp.float32), np.float64).reshape(-1)
    absmax = np.repeat(np.asarray(quant.block_absmax(qt), np.float64), block_size)[: x.size]
    # Half the largest table gap, plus the distance of bnb's float32 threshold literals from the
    # exact midpoints (<= 3e-7, FP4's 0.583333) and the float32 scaling rounding (~1e-7).
    bound = (_max_half_gap(quant_type) + 1e-6) * absmax
    assert np.all(np.abs(y - x.reshape(-1).astype(np.float64)) <= bound)
    assert y.shape == (x.size,) and np.all(np.isfinite(y))


@PROPERTY_SETTINGS
@given(x=tensors(), quant_type=QUANT_TYPES, block_size=BLOCK_SIZES)
def test_double_quant_error_bounded(x, quant_type, block_size):
    qt = quant.quantize(x, quant_type, block_size, double_quant=True, nested_block_size=256)
    y = np.asarray(quant.dequantize(qt, jnp.float32), np.float64).reshape(-1)
    true_absmax = np.abs(np.pad(x.reshape(-1), (0, (-x.size) % block_size))).reshape(-1, block_size).max(1)
    dq_absmax = np.asarray(quant.block_absmax(qt), np.float64)
    # |y - x| <= |table[c]| * |absmax' - absmax| + gap/2 * absmax, with |table[c]| <= 1.
    bound = np.repeat(np.abs(dq_absmax - true_absmax) + (_max_half_gap(quant_type) + 1e-6) * true_absmax, block_size)
    assert np.all(np.abs(y - x.reshape(-1)) <= bound[: x.size] * (1 + 1e-6))


@PROPERTY_SETTINGS
@given(x=tensors(), quant_type=QUANT_TYPES, block_size=BLOCK_SIZES, k=st.integers(-20, 20))
def test_power_of_two_scaling_keeps_codes(x, quant_type, block_size, k):
    a = quant.quantize(x, quant_type, block_size, double_quant=False)
    b = quant.quantize(x * f32(2.0**k), quant_type, block_size, double_quant=False)
    np.testing.assert_array_equal(np.asarray(a.packed), np.asarray(b.packed))
    np.testing.assert_array_equal(np.asarray(a.absmax) * f32(2.0**k), np.asarray(b.absmax))


@PROPERTY_SETTINGS
@given(x=tensors(), quant_type=QUANT_TYPES, block_size=BLOCK_SIZES)
def test_quantize_dequantize_is_idempotent(x, quant_type, block_size):
    qt = quant.quantize(x, quant_type, block_size, double_quant=False)
    y = quant.dequantize(qt, jnp.float32)
    qt2 = quant.quantize(y, quant_type, block_size, double_quant=False)
    np.testing.assert_array_equal(np.asarray(qt2.absmax), np.asarray(qt.absmax))
    np.testing.assert_array_equal(np.asarray(quant.dequantize(qt2, jnp.float32)), np.asarray(y))
    if quant_type != "fp4":  # FP4's -0 (code 8) dequantizes to +0 and comes back as code 0
        np.testing.assert_array_equal(np.asarray(qt2.packed), np.asarray(qt.packed))
