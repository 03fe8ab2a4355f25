"""Code tables: derived from their definitions and checked against bitsandbytes' values."""

import numpy as np
import pytest

from qlora_jax.quant import codebooks


@pytest.mark.bnb
def test_bnb_fixture_versions(bnb):
    assert bnb.versions["bitsandbytes"] == "0.50.2"


def test_nf4_derivation_rounds_to_canonical_table():
    np.testing.assert_array_equal(codebooks.derive_nf4(), codebooks.NF4)


def test_nf4_structure():
    t = codebooks.NF4
    assert t.dtype == np.float32
    assert np.all(np.diff(t) > 0)
    assert (t < 0).sum() == 7 and (t == 0).sum() == 1 and (t > 0).sum() == 8
    assert t[0] == -1.0 and t[-1] == 1.0 and t[7] == 0.0


@pytest.mark.bnb
def test_4bit_tables_equal_bnb(bnb):
    np.testing.assert_array_equal(codebooks.NF4, bnb["tables/nf4"])
    np.testing.assert_array_equal(codebooks.FP4, bnb["tables/fp4"])
    # bnb stores +0.0 for FP4 code 8; the sign bit is only set by the CUDA quantizer's codes.
    assert not np.signbit(codebooks.FP4[8])


def test_nf4_thresholds_are_float32_midpoints():
    mid = (codebooks.NF4[:-1].astype(np.float64) + codebooks.NF4[1:]) / 2
    np.testing.assert_array_equal(codebooks.NF4_THRESHOLDS, mid.astype(np.float32))


def test_fp4_thresholds_separate_sorted_magnitudes():
    mags = np.sort(codebooks.FP4[:8])
    t = codebooks.FP4_THRESHOLDS.astype(np.float64)
    assert np.all(mags[:-1] < t) and np.all(t < mags[1:])
    mid = (mags[:-1].astype(np.float64) + mags[1:]) / 2
    assert np.abs(t - mid).max() < 4e-7  # bnb's literal 0.583333 for 7/12 is the farthest
    np.testing.assert_array_equal(codebooks.FP4[codebooks.FP4_MAGNITUDE_ORDER], mags)
    k = np.arange(8, dtype=np.uint8)
    np.testing.assert_array_equal(k ^ ((k & 2) << 1), codebooks.FP4_MAGNITUDE_ORDER)


def test_int4_table_is_symmetric_sevenths():
    vals = np.round(codebooks.INT4 * 7).astype(int)
    np.testing.assert_array_equal(vals, [7, 6, 5, 4, 3, 2, 1, 0, 0, -1, -2, -3, -4, -5, -6, -7])
    np.testing.assert_array_equal(codebooks.INT4, (vals / 7).astype(np.float32))


@pytest.mark.bnb
@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bnb(bnb, signed):
    ref = bnb["tables/dynamic_signed" if signed else "tables/dynamic_unsigned"]
    np.testing.assert_array_equal(codebooks.dynamic_map(signed=signed), ref)


def test_dynamic_signed_structure():
    t = codebooks.DYNAMIC_SIGNED
    assert t.shape == (256,) and t.dtype == np.float32
    assert np.all(np.diff(t) > 0)  # 256 distinct values: no duplicate codes
    assert t[-1] == 1.0 and (t == 0).sum() == 1 and t[0] > -1.0


def test_exact_midpoint_thresholds_decide_like_float64_nearest():
    rng = np.random.default_rng(0)
    table = codebooks.DYNAMIC_SIGNED
    t = codebooks.exact_midpoint_thresholds(table)
    # Values exactly on, just above and just below every float64 midpoint, plus random ones.
    mid = (table[:-1].astype(np.float64) + table[1:]) / 2
    near = mid.astype(np.float32)
    x = np.concatenate(
        [
            near,
            np.nextafter(near, np.float32(np.inf)),
            np.nextafter(near, np.float32(-np.inf)),
            rng.uniform(-1, 1, 20000).astype(np.float32),
        ]
    )
    code = np.searchsorted(t, x, side="left")
    dist = np.abs(x[:, None].astype(np.float64) - table[None, :].astype(np.float64))
    np.testing.assert_array_equal(code, np.argmin(dist, axis=1))  # argmin: ties -> lower index


def test_table_rejects_unknown_type():
    with pytest.raises(ValueError, match="quant_type must be one of"):
        codebooks.table("nf3")
