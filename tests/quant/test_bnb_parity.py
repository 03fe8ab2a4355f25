"""qlora_jax's 4-bit tensors against bitsandbytes 0.50.2 (golden fixtures, tests/fixtures).

The fixtures come from bnb's CPU path; our rules are its CUDA kernels'. Where the two differ
(shared/reference/bitsandbytes-nf4.md, "departs ... measured"), each test names the departure and
checks that every difference is one of them — no tolerance hides anything else:

* FP4 zero sign: CUDA writes the sign bit from ``x < 0`` even for a zero magnitude; bnb's CPU
  bucketize writes code 0 or 8 by table order.
* FP4 threshold ties: CUDA compares ``|x|`` with its literals (``>``, ties to the smaller
  magnitude); bnb's CPU path uses float32 midpoints of the signed table (negative ties to the
  larger magnitude). Only values within a few float32 steps of a threshold can differ.
* Double-quant 8-bit codes: CPU uses a lookup-table approximation of nearest-code; differences
  are adjacent codes (or values within 2/65536). Judged by value, not index.
* The double-quant offset is a float32 mean whose last bit depends on summation order: 1 ulp.
* A nested block of constants all equal to the offset (nested absmax 0): any code reads back as
  0; bnb writes code 0, we write the code of 0.0.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from bnb_fixtures import FIXTURES, BnbFixtures

from qlora_jax import quant
from qlora_jax.quant import codebooks

pytestmark = pytest.mark.bnb

f32 = np.float32


def _cases(bnb_cases, **filters):
    out = []
    for name in bnb_cases:
        shape, dtype, quant_type, block, mode = name.split("/")
        fields = dict(shape=shape, dtype=dtype, quant_type=quant_type, block_size=int(block[1:]), dq=mode == "dq")
        if all(fields[k] == v for k, v in filters.items()):
            out.append(pytest.param(name, fields, id=name))
    return out


# Parametrization needs the case names at collection time.
CASES = BnbFixtures(FIXTURES / "bnb_4bit.npz").cases


def _unpack(packed, n):
    packed = np.asarray(packed).reshape(-1)
    return np.stack([packed >> 4, packed & 15], axis=-1).reshape(-1)[:n]


def _scaled_input(bnb, name, fields):
    x = bnb.array(f"input/{fields['shape']}/{fields['dtype']}", fields["dtype"]).reshape(-1)
    return x


def _classify_fp4_differences(x, absmax, ours, theirs, block_size):
    """Return the indices of code differences that are NOT a known CPU/CUDA FP4 departure."""
    idx = np.nonzero(ours != theirs)[0]
    a = np.repeat(absmax, block_size)[: x.size][idx]
    scaled = np.where(a > 0, x[idx].astype(f32) * (f32(1) / np.where(a > 0, a, 1)), 0).astype(f32)
    mo, mt = ours[idx] & 7, theirs[idx] & 7
    zero_sign = (mo == 0) & (mt == 0)
    # Threshold tie: adjacent magnitudes, same sign bit, |scaled| at the threshold between them.
    rank = np.argsort(codebooks.FP4_MAGNITUDE_ORDER)  # magnitude code -> sorted position
    ro, rt = rank[mo], rank[mt]
    adjacent = np.abs(ro.astype(int) - rt.astype(int)) == 1
    same_sign = (ours[idx] & 8) == (theirs[idx] & 8)
    between = np.minimum(ro, rt)
    t = codebooks.FP4_THRESHOLDS[np.minimum(between, 6)].astype(np.float64)
    mags = np.sort(codebooks.FP4[:8]).astype(np.float64)
    mid = (mags[np.minimum(between, 6)] + mags[np.minimum(between, 6) + 1]) / 2
    near = np.abs(np.abs(scaled.astype(np.float64)) - t) <= np.maximum(np.abs(t - mid), 0) + 4 * np.spacing(f32(t))
    tie = adjacent & same_sign & near
    return idx[~(zero_sign | tie)], int(zero_sign.sum()), int(tie.sum())


@pytest.mark.parametrize("name,fields", _cases(CASES, quant_type="nf4"))
def test_nf4_packed_and_absmax_equal_bnb(bnb, name, fields):
    x = _scaled_input(bnb, name, fields)
    qt = quant.quantize(x, "nf4", fields["block_size"], fields["dq"])
    p = f"case/{name}/"
    np.testing.assert_array_equal(np.asarray(qt.packed), bnb[p + "packed"])
    if not fields["dq"]:
        np.testing.assert_array_equal(np.asarray(qt.absmax), bnb[p + "absmax"])


@pytest.mark.parametrize("name,fields", _cases(CASES, quant_type="fp4"))
def test_fp4_codes_equal_bnb_up_to_known_departures(bnb, name, fields):
    x = _scaled_input(bnb, name, fields)
    bs = fields["block_size"]
    qt = quant.quantize(x, "fp4", bs, fields["dq"])
    p = f"case/{name}/"
    ours, theirs = _unpack(qt.packed, x.size), _unpack(bnb[p + "packed"], x.size)
    absmax = np.asarray(quant.block_absmax(qt)) if not fields["dq"] else bnb[f"case/{name[:-2]}plain/absmax"]
    unexplained, _, ties = _classify_fp4_differences(x, absmax, ours, theirs, bs)
    assert unexplained.size == 0, f"unexplained FP4 code differences at {unexplained[:10]}"
    assert ties <= max(2, x.size // 500)  # ties are rare (~0.05 % measured on bf16)
    if not fields["dq"]:
        np.testing.assert_array_equal(np.asarray(qt.absmax), bnb[p + "absmax"])


def test_fp4_departure_classifier_rejects_real_errors(bnb):
    # The classifier must not explain away a wrong code: flip one nonzero code by 2 magnitudes.
    name = "mat80x300/float32/fp4/b64/plain"
    x = bnb.array("input/mat80x300/float32", "float32").reshape(-1)
    theirs = _unpack(bnb[f"case/{name}/packed"], x.size)
    ours = theirs.copy()
    i = int(np.nonzero((theirs & 7) == 4)[0][0])
    ours[i] = (ours[i] & 8) | 2
    unexplained, _, _ = _classify_fp4_differences(x, bnb[f"case/{name}/absmax"], ours, theirs, 64)
    np.testing.assert_array_equal(unexplained, [i])


@pytest.mark.parametrize("name,fields", _cases(CASES, dq=True))
def test_double_quant_matches_bnb(bnb, name, fields):
    x = _scaled_input(bnb, name, fields)
    qt = quant.quantize(x, fields["quant_type"], fields["block_size"], True)
    p = f"case/{name}/"
    off, ref_off = np.float32(qt.offset), bnb[p + "offset"][()]
    absmax = bnb[f"case/{name[: -len('dq')]}plain/absmax"]
    exact = np.mean(absmax.astype(np.float64))
    assert off == np.float32(exact)  # ours is the correctly rounded mean
    # bnb's (torch's float32 cascade sum) is within 1 ulp of ours, or else further from the
    # exact mean than ours: its own rounding, not a difference of definition.
    ulps = abs(int(off.view(np.int32)) - int(ref_off.view(np.int32)))
    assert ulps <= 1 or abs(float(ref_off) - exact) > abs(float(off) - exact)
    nested, ref_nested = np.asarray(qt.nested_absmax), bnb[p + "nested_absmax"]
    if off == ref_off:
        np.testing.assert_array_equal(nested, ref_nested)
    else:  # max|absmax - offset| moves by at most the offset's change, plus one rounding
        assert np.all(np.abs(nested - ref_nested) <= abs(off - ref_off) + np.spacing(ref_nested))
    table = codebooks.DYNAMIC_SIGNED
    codes, ref_codes = np.asarray(qt.absmax), bnb[p + "absmax"]
    differ = codes != ref_codes
    neighbours = np.abs(codes.astype(int) - ref_codes.astype(int)) == 1
    close = np.abs(table[codes] - table[ref_codes]) <= 2 / 65536
    # A nested block whose absmax is 0 (all its constants equal the offset) reads every code back
    # as 0: bnb writes code 0 there, we write the code of 0.0; the values are identical.
    zero_block = np.repeat(ref_nested == 0, 256)[: codes.size]
    assert np.all(~differ | neighbours | close | zero_block)


def test_double_quant_codes_agree_with_bnb_on_a_large_tensor(bnb):
    # randn(1024, 1024), block 64: 16384 block constants from bnb, double-quantized by both.
    from qlora_jax.quant import blockwise

    codes, nested, offset = blockwise.double_quantize(jnp.asarray(bnb["dq_large/absmax"]), 256)
    codes, ref = np.asarray(codes), bnb["dq_large/codes"]
    assert np.float32(offset) == bnb["dq_large/offset"][()]
    np.testing.assert_array_equal(np.asarray(nested), bnb["dq_large/nested_absmax"])
    differ = codes != ref
    assert differ.mean() <= 0.005
    t = codebooks.DYNAMIC_SIGNED
    assert np.all(
        (np.abs(codes.astype(int) - ref.astype(int)) == 1)[differ] | (np.abs(t[codes] - t[ref]) <= 2 / 65536)[differ]
    )


@pytest.mark.parametrize("name,fields", _cases(CASES))
def test_dequantize_of_bnb_state_equals_bnb(bnb, name, fields):
    """Our dequantize of bnb's own bytes gives bnb's values, in the input dtype."""
    p = f"case/{name}/"
    x = _scaled_input(bnb, name, fields)
    dq = fields["dq"]
    qt = quant.QuantizedTensor(
        packed=jnp.asarray(bnb[p + "packed"]),
        absmax=jnp.asarray(bnb[p + "absmax"]),
        nested_absmax=jnp.asarray(bnb[p + "nested_absmax"]) if dq else None,
        offset=jnp.asarray(bnb[p + "offset"]) if dq else None,
        shape=x.shape,
        dtype=fields["dtype"],
        quant_type=fields["quant_type"],
        block_size=fields["block_size"],
        nested_block_size=256 if dq else None,
    )
    y = np.asarray(quant.dequantize(qt))
    # bnb's CPU dequantize returns some 1-D inputs as [1, n]; the values are what matter.
    ref = bnb.array(p + "dequantized", fields["dtype"]).reshape(y.shape)
    assert y.dtype == ref.dtype
    np.testing.assert_array_equal(y.astype(f32), ref.astype(f32))


@pytest.mark.parametrize("tag", ["nf4_plain", "nf4_dq"])
def test_nf4_state_dict_is_byte_identical_to_bnb(bnb, tag):
    ref = bnb.state_dict(tag)
    x = bnb.array(f"statedict/{tag}/input", "bfloat16")
    sd = quant.to_bnb_state_dict(quant.quantize(x, "nf4", 64, tag.endswith("dq")), prefix="weight")
    assert sorted(sd) == sorted(ref)
    for k in ref:
        assert sd[k].dtype == ref[k].dtype and sd[k].shape == ref[k].shape, k
        np.testing.assert_array_equal(sd[k], ref[k], err_msg=k)


@pytest.mark.parametrize("tag", ["fp4_plain", "fp4_dq"])
def test_fp4_state_dict_equals_bnb_up_to_known_departures(bnb, tag):
    ref = bnb.state_dict(tag)
    x = bnb.array(f"statedict/{tag}/input", "bfloat16")
    qt = quant.quantize(x, "fp4", 64, tag.endswith("dq"))
    sd = quant.to_bnb_state_dict(qt, prefix="weight")
    assert sorted(sd) == sorted(ref)
    for k in ref:
        if k != "weight":
            np.testing.assert_array_equal(sd[k], ref[k], err_msg=k)
    n = x.size
    absmax = np.asarray(quant.block_absmax(quant.quantize(x, "fp4", 64, False)))
    unexplained, _, _ = _classify_fp4_differences(
        x.reshape(-1), absmax, _unpack(sd["weight"], n), _unpack(ref["weight"], n), 64
    )
    assert unexplained.size == 0


@pytest.mark.parametrize("tag", ["nf4_plain", "nf4_dq", "fp4_plain", "fp4_dq"])
def test_bnb_state_dict_round_trips_exactly(bnb, tag):
    ref = bnb.state_dict(tag)
    qt = quant.from_bnb_state_dict(ref, prefix="weight")
    assert qt.shape == (24, 100) and qt.dtype == "bfloat16" and qt.block_size == 64
    back = quant.to_bnb_state_dict(qt, prefix="weight")
    assert sorted(back) == sorted(ref)
    for k in ref:
        assert back[k].dtype == ref[k].dtype and back[k].shape == ref[k].shape, k
        np.testing.assert_array_equal(back[k], ref[k], err_msg=k)
