"""Block-wise quantization against independent oracles: bnb's CUDA decision trees ported to
numpy, exact nearest-code in float64, and analytic values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.quant import blockwise, codebooks

f32 = np.float32


# --- Ports of bitsandbytes' CUDA device functions (csrc/kernels.cu), as written there. ---------


def _tree(x, node):
    """Evaluate a nested (threshold, if_greater, else) decision tree elementwise."""
    if isinstance(node, int):
        return np.full(x.shape, node, np.uint8)
    t, hi, lo = node
    return np.where(x > f32(t), _tree(x, hi), _tree(x, lo))


# dQuantizeNF4: the tree with its float literals.
_NF4_TREE = (
    0.03979014977812767,
    (
        0.3893125355243683,
        (0.6427869200706482, (0.8614784181118011, 0b1111, 0b1110), (0.5016634166240692, 0b1101, 0b1100)),
        (0.2035212516784668, (0.2920137718319893, 0b1011, 0b1010), (0.1202552504837513, 0b1001, 0b1000)),
    ),
    (
        -0.33967943489551544,
        (-0.13791173323988914, (-0.045525018125772476, 0b0111, 0b0110), (-0.23460740596055984, 0b0101, 0b0100)),
        (-0.6106329262256622, (-0.4599952697753906, 0b0011, 0b0010), (-0.8480964004993439, 0b0001, 0b0000)),
    ),
)

# dQuantizeFP4 on |x|, the sign bit added from x < 0.
_FP4_TREE = (
    0.29166667,
    (0.583333, (0.8333333, 0b0011, 0b0010), (0.4166667, 0b0101, 0b0100)),
    (0.0859375, (0.20833333, 0b0111, 0b0110), (0.00260417, 0b0001, 0b0000)),
)


def cuda_nf4(x):
    return _tree(np.asarray(x, f32), _NF4_TREE)


def cuda_fp4(x):
    x = np.asarray(x, f32)
    return _tree(np.abs(x), _FP4_TREE) + np.where(x < 0, 8, 0).astype(np.uint8)


def _scaled_probe_values():
    """Random values in [-1, 1] plus every threshold exactly and one float32 step either side."""
    rng = np.random.default_rng(1)
    ts = np.concatenate([codebooks.NF4_THRESHOLDS, codebooks.FP4_THRESHOLDS, -codebooks.FP4_THRESHOLDS])
    return np.concatenate(
        [
            rng.uniform(-1, 1, 50000).astype(f32),
            ts,
            np.nextafter(ts, f32(2)),
            np.nextafter(ts, f32(-2)),
            np.array([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, np.nan], f32),
        ]
    )


@pytest.mark.parametrize("quant_type,oracle", [("nf4", cuda_nf4), ("fp4", cuda_fp4)])
def test_encode_matches_cuda_decision_tree(quant_type, oracle):
    x = _scaled_probe_values()
    got = np.asarray(jax.jit(blockwise.encode_4bit, static_argnums=1)(jnp.asarray(x), quant_type))
    np.testing.assert_array_equal(got, oracle(x))


def test_ties_take_the_lower_code():
    t = codebooks.NF4_THRESHOLDS
    got = np.asarray(blockwise.encode_4bit(jnp.asarray(t), "nf4"))
    np.testing.assert_array_equal(got, np.arange(15))
    got = np.asarray(blockwise.encode_4bit(jnp.asarray(np.nextafter(t, f32(2))), "nf4"))
    np.testing.assert_array_equal(got, np.arange(1, 16))


def test_fp4_tiny_negative_keeps_sign_bit():
    got = np.asarray(blockwise.encode_4bit(jnp.asarray([-1e-6, 1e-6, 0.0, -0.0], f32), "fp4"))
    np.testing.assert_array_equal(got, [8, 0, 0, 0])


def test_int4_is_nearest_seventh_ties_lower():
    x = np.concatenate([np.linspace(-1, 1, 20001, dtype=f32), (np.arange(-6, 8) - 0.5).astype(f32) / 7])
    got = np.asarray(blockwise.encode_4bit(jnp.asarray(x), "int4"))
    value = codebooks.INT4[got]
    levels = (np.arange(-7, 8) / 7).astype(f32).astype(np.float64)  # the float32 table values
    dist = np.abs(x[:, None].astype(np.float64) - levels[None, :])
    np.testing.assert_array_equal(np.round(value * 7), np.argmin(dist, axis=1) - 7)
    assert not np.any(got == 8)  # zero is written as code 7


def test_pack_order_matches_bnb_check_vector():
    # bnb CPU run: [-1, 1, 0, 0.5] in one block packs to 0x0f, 0x7c.
    packed, absmax = blockwise.quantize_4bit_blocks(jnp.asarray([-1.0, 1.0, 0.0, 0.5]), "nf4", 64)
    np.testing.assert_array_equal(np.asarray(packed), np.array([0x0F, 0x7C], np.uint8))
    np.testing.assert_array_equal(np.asarray(absmax), [1.0])


def test_unpack_inverts_pack():
    codes = np.random.default_rng(2).integers(0, 16, 1000).astype(np.uint8)
    packed = blockwise.pack_nibbles(jnp.asarray(codes))
    np.testing.assert_array_equal(np.asarray(packed)[:3], (codes[0:6:2] << 4) | codes[1:6:2])
    np.testing.assert_array_equal(np.asarray(blockwise.unpack_nibbles(packed)), codes)
    values = np.asarray(blockwise.unpack_values(packed, "fp4"))
    np.testing.assert_array_equal(values, codebooks.FP4[codes])


def test_odd_length_pads_with_zero_code():
    x = jnp.asarray([0.5, -1.0, 0.25], jnp.float32)
    packed, _ = blockwise.quantize_4bit_blocks(x, "nf4", 64)
    assert packed.shape == (2,)
    assert int(packed[1]) & 0xF == 7  # NF4 code of 0.0


def test_scales_by_float32_reciprocal_not_division():
    # Find values where x * (1/a) and x / a fall on different sides of an NF4 threshold; the
    # quantizer must follow the reciprocal, as CUDA does.
    rng = np.random.default_rng(3)
    a = rng.uniform(0.5, 2.0, 20000).astype(f32)
    t = codebooks.NF4_THRESHOLDS[rng.integers(0, 15, a.size)]
    x = (t.astype(np.float64) * a).astype(f32)
    x = np.concatenate([x, np.nextafter(x, f32(9)), np.nextafter(x, f32(-9))])
    a = np.tile(a, 3)
    by_recip, by_div = cuda_nf4(x * (f32(1) / a)), cuda_nf4(x / a)
    differ = np.nonzero(by_recip != by_div)[0][:32]
    assert differ.size > 0, "no probe separates the two rules; widen the search"
    # One block per probe value: the block's absmax is a[i] (a second element equal to it).
    blocks = np.stack([x[differ], a[differ]], axis=1)
    blocks = np.pad(blocks, ((0, 0), (0, 62)))
    packed, absmax = blockwise.quantize_4bit_blocks(jnp.asarray(blocks), "nf4", 64)
    np.testing.assert_array_equal(np.asarray(absmax), a[differ])
    np.testing.assert_array_equal(np.asarray(packed).reshape(-1, 32)[:, 0] >> 4, by_recip[differ])


def test_partial_last_block_absmax_is_over_valid_elements():
    x = np.concatenate([np.ones(64, f32), [-0.25, 0.125]]).astype(f32)
    _, absmax = blockwise.quantize_4bit_blocks(jnp.asarray(x), "nf4", 64)
    np.testing.assert_array_equal(np.asarray(absmax), [1.0, 0.25])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_all_zero_block_is_exactly_zero(quant_type):
    x = np.concatenate([np.zeros(64, f32), np.linspace(-1, 1, 64, dtype=f32)])
    packed, absmax = blockwise.quantize_4bit_blocks(jnp.asarray(x), quant_type, 64)
    y = np.asarray(blockwise.dequantize_4bit_blocks(packed, absmax, quant_type, 64, x.size, jnp.float32))
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y[:64], 0.0)
    # And through double quantization, where the zero absmax comes back as a nonzero residue.
    codes, nested, offset = blockwise.double_quantize(absmax, 256)
    absmax_dq = blockwise.double_dequantize(codes, nested, offset, 256)
    assert float(absmax_dq[0]) != 0.0
    y = np.asarray(blockwise.dequantize_4bit_blocks(packed, absmax_dq, quant_type, 64, x.size, jnp.float32))
    np.testing.assert_array_equal(y[:64], 0.0)


def test_nan_poisons_only_its_block():
    x = np.linspace(-1, 1, 192, dtype=f32)
    x[70] = np.nan
    packed, absmax = blockwise.quantize_4bit_blocks(jnp.asarray(x), "nf4", 64)
    y = np.asarray(blockwise.dequantize_4bit_blocks(packed, absmax, "nf4", 64, x.size, jnp.float32))
    assert np.all(np.isnan(y[64:128]))
    assert np.all(np.isfinite(y[:64])) and np.all(np.isfinite(y[128:]))


# --- 8-bit step of double quantization ---------------------------------------------------------


def _nearest_code_float64(scaled):
    t = codebooks.DYNAMIC_SIGNED.astype(np.float64)
    return np.argmin(np.abs(scaled.astype(np.float64)[:, None] - t[None, :]), axis=1)


def test_8bit_codes_are_exact_nearest():
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(5000) * rng.choice([1e-3, 1.0, 10.0], 5000)).astype(f32)
    codes, absmax = blockwise.quantize_blockwise_8bit(jnp.asarray(x), codebooks.DYNAMIC_SIGNED, 256)
    a = np.asarray(absmax)
    np.testing.assert_array_equal(a, np.abs(np.pad(x, (0, 120))).reshape(-1, 256).max(1))
    scaled = x * np.repeat(f32(1) / a, 256)[: x.size]
    np.testing.assert_array_equal(np.asarray(codes), _nearest_code_float64(scaled))


@pytest.mark.parametrize("n", [1, 3, 7, 188, 256, 1000, 262144])
def test_accurate_mean_is_correctly_rounded(n):
    rng = np.random.default_rng(n)
    mean = jax.jit(blockwise.accurate_mean)
    for trial in range(20 if n < 5000 else 2):
        x = (np.abs(rng.standard_normal(n)) * rng.choice([1e-3, 0.02, 7.0], n)).astype(f32)
        x[: n // 6] = 0.0  # zero blocks are common in absmax vectors
        exact = np.float32(np.mean(x.astype(np.float64)))  # float64 sum of float32: ~exact
        got = np.float32(mean(jnp.asarray(x)))
        assert got == exact, (n, trial, got, exact)


def test_double_dequantize_rounds_twice_not_fused():
    rng = np.random.default_rng(6)
    absmax = np.abs(rng.standard_normal(4096)).astype(f32)
    codes, nested, offset = jax.jit(blockwise.double_quantize, static_argnums=1)(jnp.asarray(absmax), 256)
    got = np.asarray(jax.jit(blockwise.double_dequantize, static_argnums=3)(codes, nested, offset, 256))
    product = (codebooks.DYNAMIC_SIGNED[np.asarray(codes)] * np.repeat(np.asarray(nested), 256)).astype(f32)
    two_roundings = (product + np.float32(offset)).astype(f32)
    np.testing.assert_array_equal(got, two_roundings)


def test_double_quant_error_is_bounded_by_half_8bit_gap():
    rng = np.random.default_rng(7)
    absmax = np.abs(rng.standard_normal(3000)).astype(f32)
    codes, nested, offset = blockwise.double_quantize(jnp.asarray(absmax), 256)
    back = np.asarray(blockwise.double_dequantize(codes, nested, offset, 256))
    gap = np.diff(codebooks.DYNAMIC_SIGNED.astype(np.float64)).max()
    bound = (gap / 2 + 1e-6) * np.repeat(np.asarray(nested, np.float64), 256)[: absmax.size]
    assert np.all(np.abs(back.astype(np.float64) - absmax) <= bound)


# --- Statistics (bitsandbytes' own test expectations) ----------------------------------------


def test_nf4_error_statistics_match_bnb():
    # bnb tests/test_functional.py: randn(1024, 1024), NF4, block 64 -> mean abs error 0.0728
    # (sigma 7.4e-5 over seeds) and mean relative error 0.2033.
    x = jax.random.normal(jax.random.key(0), (1024, 1024), jnp.float32)
    packed, absmax = blockwise.quantize_4bit_blocks(x, "nf4", 64)
    y = blockwise.dequantize_4bit_blocks(packed, absmax, "nf4", 64, x.size, jnp.float32).reshape(x.shape)
    err = jnp.abs(x - y)
    assert abs(float(err.mean()) - 0.0728) < 4e-4  # ~5 sigma
    assert abs(float((err / (jnp.abs(x) + 1e-8)).mean()) - 0.2033) < 2e-3


@pytest.mark.bnb
def test_error_statistics_close_to_bnb_measured(bnb):
    # The same statistic measured by the fixture script on torch's randn: both samples of the
    # same distribution, so within a few sigma of each other.
    x = jax.random.normal(jax.random.key(1), (1024, 1024), jnp.float32)
    packed, absmax = blockwise.quantize_4bit_blocks(x, "nf4", 64)
    y = blockwise.dequantize_4bit_blocks(packed, absmax, "nf4", 64, x.size, jnp.float32).reshape(x.shape)
    assert abs(float(jnp.abs(x - y).mean()) - float(bnb["stats/nf4_b64_mean_abs_err"])) < 4e-4
