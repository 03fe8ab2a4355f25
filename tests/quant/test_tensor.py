"""QuantizedTensor and the public quantize/dequantize/bnb API: pytree behaviour, memory
accounting, serialization and bad input."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from qlora_jax import quant
from qlora_jax.quant import bits_per_param, codebooks, quantization_error, quantize

f32 = np.float32


def _weights(shape=(96, 160), seed=0, dtype=np.float32):
    return (np.random.default_rng(seed).standard_normal(shape) * 0.02).astype(dtype)


# --- API and structure --------------------------------------------------------------------------


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_round_trip_shape_dtype_and_fields(dq, dtype):
    x = _weights((33, 100), dtype=dtype)  # 3300 elements: partial last block, even count
    qt = quant.quantize(x, "nf4", 64, dq)
    assert qt.shape == (33, 100) and qt.dtype == np.dtype(dtype).name and qt.double_quant == dq
    assert qt.packed.dtype == jnp.uint8 and qt.packed.shape == (1650,)
    assert qt.absmax.shape == (52,) and qt.absmax.dtype == (jnp.uint8 if dq else jnp.float32)
    if dq:
        assert qt.nested_absmax.shape == (1,) and qt.offset.shape == ()
    y = quant.dequantize(qt)
    assert y.shape == x.shape and y.dtype == jnp.dtype(dtype)
    assert quant.dequantize(qt, jnp.float32).dtype == jnp.float32


def test_dequantize_dtype_is_one_rounding_of_the_float32_value():
    x = _weights()
    qt = quant.quantize(x, "nf4", 64, True)
    y32 = np.asarray(quant.dequantize(qt, jnp.float32))
    for dtype in (jnp.bfloat16, jnp.float16):
        np.testing.assert_array_equal(np.asarray(quant.dequantize(qt, dtype)), y32.astype(dtype))


@pytest.mark.parametrize(
    "block_size,dq,expected",
    [
        (64, True, 4 + 8 / 64 + 32 / (64 * 256)),  # 4.127: QLoRA's figure
        (64, False, 4 + 32 / 64),  # 4.5
        (128, False, 4 + 32 / 128),
        (4096, True, 4 + 8 / 4096 + 32 / (4096 * 256)),
    ],
)
def test_bits_per_param_from_the_arrays(block_size, dq, expected):
    qt = jax.eval_shape(lambda: quant.quantize(jnp.zeros((4096, 4096), jnp.bfloat16), "nf4", block_size, dq))
    n = 4096 * 4096
    nbytes = n // 2 + (n // block_size) * (1 if dq else 4)
    if dq:
        nbytes += 4 * (-(-(n // block_size) // 256)) + 4
    assert qt.nbytes == nbytes
    assert qt.bits_per_param == pytest.approx(expected, abs=32 / n + 1e-12)
    if block_size == 64 and dq:
        assert round(qt.bits_per_param, 3) == 4.127


def test_passes_through_jit_unchanged():
    qt = quant.quantize(_weights(), "nf4", 64, True)
    same = jax.jit(lambda t: t)(qt)
    assert jax.tree.structure(same) == jax.tree.structure(qt)
    for a, b in zip(jax.tree.leaves(qt), jax.tree.leaves(same), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # quantize and dequantize compose inside a user's jit, options static
    y = jax.jit(lambda w: quant.dequantize(quant.quantize(w, "fp4", 128, False), jnp.float32))(_weights())
    np.testing.assert_array_equal(y, quant.dequantize(quant.quantize(_weights(), "fp4", 128, False), jnp.float32))


def test_tree_map_and_leaves():
    qt = quant.quantize(_weights(), "nf4", 64, True)
    leaves = jax.tree.leaves(qt)
    assert [leaf.dtype for leaf in leaves] == [jnp.uint8, jnp.uint8, jnp.float32, jnp.float32]
    copied = jax.tree.map(lambda a: a.copy(), qt)
    assert isinstance(copied, quant.QuantizedTensor) and copied.quant_type == "nf4"
    np.testing.assert_array_equal(quant.dequantize(copied), quant.dequantize(qt))
    plain = quant.quantize(_weights(), "nf4", 64, False)
    assert len(jax.tree.leaves(plain)) == 2  # None fields are empty subtrees


@pytest.mark.parametrize("dq", [False, True])
def test_orbax_save_restore_unchanged(tmp_path, dq):
    qt = quant.quantize(_weights(dtype=ml_dtypes.bfloat16), "nf4", 64, dq)
    tree = {"layer": {"kernel": qt}}
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", tree)
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(tmp_path / "ckpt", jax.eval_shape(lambda: tree))
    back = restored["layer"]["kernel"]
    assert isinstance(back, quant.QuantizedTensor)
    assert (back.shape, back.dtype, back.quant_type, back.block_size, back.nested_block_size) == (
        qt.shape,
        qt.dtype,
        qt.quant_type,
        qt.block_size,
        qt.nested_block_size,
    )
    for a, b in zip(jax.tree.leaves(qt), jax.tree.leaves(back), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_block_absmax_undoes_double_quant():
    x = _weights((64, 512))
    plain = quant.quantize(x, "nf4", 64, False)
    dq = quant.quantize(x, "nf4", 64, True)
    a, b = np.asarray(quant.block_absmax(plain)), np.asarray(quant.block_absmax(dq))
    np.testing.assert_array_equal(a, np.abs(x).reshape(-1, 64).max(1))
    assert np.abs(a - b).max() <= 0.01 * np.abs(a - a.mean()).max()  # half the dynamic map's 0.014 top gap


# --- bnb state dict ------------------------------------------------------------------------------


def test_state_dict_keys_and_json():
    qt = quant.quantize(_weights((24, 100), dtype=ml_dtypes.bfloat16), "nf4", 64, True)
    sd = quant.to_bnb_state_dict(qt, prefix="model.layers.0.mlp.up_proj.weight")
    p = "model.layers.0.mlp.up_proj.weight"
    assert set(sd) == {
        p,
        f"{p}.absmax",
        f"{p}.quant_map",
        f"{p}.nested_absmax",
        f"{p}.nested_quant_map",
        f"{p}.quant_state.bitsandbytes__nf4",
    }
    assert sd[p].shape == (1200, 1) and sd[p].dtype == np.uint8
    meta = json.loads(sd[f"{p}.quant_state.bitsandbytes__nf4"].tobytes())
    assert meta == {
        "quant_type": "nf4",
        "blocksize": 64,
        "dtype": "bfloat16",
        "shape": [24, 100],
        "nested_blocksize": 256,
        "nested_dtype": "float32",
        "nested_offset": float(np.float32(qt.offset)),
    }
    back = quant.from_bnb_state_dict(sd, prefix=p)
    for a, b in zip(jax.tree.leaves(qt), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert back.shape == qt.shape and back.dtype == qt.dtype


def test_int4_has_no_bnb_serialization():
    with pytest.raises(ValueError, match="bitsandbytes serializes only"):
        quant.to_bnb_state_dict(quant.quantize(_weights(), "int4", 64, False))


def _sd():
    return quant.to_bnb_state_dict(quant.quantize(_weights((24, 100)), "nf4", 64, True))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda sd: sd.pop("weight.absmax"), "no key 'weight.absmax'"),
        (lambda sd: sd.pop("weight.quant_state.bitsandbytes__nf4"), "exactly one 'weight.quant_state"),
        (lambda sd: sd.__setitem__("weight.quant_map", sd["weight.quant_map"][::-1].copy()), "not the canonical nf4"),
        (lambda sd: sd.__setitem__("weight", sd["weight"][:-1]), "'weight' should be uint8\\[1200\\]"),
        (
            lambda sd: sd.__setitem__("weight.quant_state.bitsandbytes__nf4", np.frombuffer(b"{bad", np.uint8)),
            "does not hold UTF-8 JSON",
        ),
        (lambda sd: sd.__setitem__("weight.nested_quant_map", np.zeros(256, f32)), "signed dynamic map"),
        (lambda sd: sd.__setitem__("weight.absmax", sd["weight.absmax"].astype(f32)), "'weight.absmax' should be"),
    ],
)
def test_from_bnb_state_dict_names_the_bad_key(mutate, match):
    sd = _sd()
    mutate(sd)
    with pytest.raises(ValueError, match=match):
        quant.from_bnb_state_dict(sd, prefix="weight")


# --- Bad input -----------------------------------------------------------------------------------


def _qt(dq=True):
    return quant.quantize(_weights((32, 256)), "nf4", 64, dq)  # 8192 elements, 128 blocks


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(shape=(16, 256)), r"QuantizedTensor.packed should be uint8\[2048\] for shape \[16, 256\]"),
        (dict(shape=(32, 0)), r"QuantizedTensor.shape must be a tuple of positive ints; got \(32, 0\)"),
        (dict(block_size=128), r"QuantizedTensor.absmax should be uint8\[64\] .*got uint8\[128\]"),
        (dict(block_size=48), r"QuantizedTensor.block_size must be one of"),
        (dict(dtype="int8"), r"QuantizedTensor.dtype must be one of \('float32', 'bfloat16', 'float16'\); got 'int8'"),
        (dict(quant_type="nf3"), r"QuantizedTensor.quant_type must be one of"),
        (dict(packed=np.zeros(4095, np.uint8)), r"QuantizedTensor.packed should be uint8\[4096\] .*got uint8\[4095\]"),
        (dict(packed=np.zeros(4096, np.int8)), r"QuantizedTensor.packed should be uint8\[4096\] .*got int8\[4096\]"),
        (dict(absmax=np.zeros(100, np.uint8)), r"QuantizedTensor.absmax should be uint8\[128\] .*got uint8\[100\]"),
        (dict(absmax=np.zeros(128, np.float32)), r"QuantizedTensor.absmax should be uint8\[128\] .*got float32"),
        (dict(offset=None), r"QuantizedTensor.offset must be an array with nested_block_size=256"),
        (dict(nested_absmax=np.zeros(2, np.float32)), r"nested_absmax should be float32\[1\] .*got float32\[2\]"),
        (dict(nested_block_size=None), r"QuantizedTensor.nested_absmax must be None with nested_block_size=None"),
    ],
)
def test_inconsistent_quantized_tensor_is_refused_naming_the_field(change, match):
    """Tampered layouts used to dequantize silently (a halved shape read half the codes) or fail
    deep inside XLA ("mul got incompatible shapes")."""
    with pytest.raises(ValueError, match=match):
        _qt().replace(**change)


def test_without_double_quant_absmax_must_be_float32():
    qt = _qt(dq=False)
    with pytest.raises(ValueError, match=r"absmax should be float32\[128\] .*got uint8\[128\]"):
        qt.replace(absmax=np.zeros(128, np.uint8))
    with pytest.raises(ValueError, match=r"QuantizedTensor.offset must be None with nested_block_size=None"):
        qt.replace(offset=np.float32(0))


def test_consistent_trees_of_a_quantized_tensor_pass():
    """What jax and orbax build from a valid tensor stays valid: stacked layers (a leading axis on
    every array), abstract shapes, tracers, shardings and float0 cotangents."""
    qt = _qt()
    stacked = jax.tree.map(lambda a: jnp.stack([a, a, a]), qt)
    assert stacked.packed.shape == (3, 4096) and stacked.absmax.shape == (3, 128)
    assert jax.eval_shape(lambda q: q, qt).shape == qt.shape
    assert jax.jit(lambda q: quant.dequantize(q, jnp.float32).sum())(qt).shape == ()
    jax.tree.map(lambda a: a.nbytes, qt)
    with pytest.raises(ValueError, match=r"absmax should be uint8\[3, 128\] .*got uint8\[2, 128\]"):
        stacked.replace(absmax=stacked.absmax[:2])


def test_orbax_restore_checks_the_layout(tmp_path):
    """A checkpoint restored against a tampered abstract tree (halved shape) is refused on restore."""
    qt = _qt()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", {"kernel": qt})
    abstract = jax.eval_shape(lambda: {"kernel": qt})
    tampered = {
        "kernel": jax.tree_util.tree_unflatten(jax.tree.structure(abstract["kernel"]), jax.tree.leaves(abstract))
    }
    object.__setattr__(tampered["kernel"], "shape", (16, 256))  # bypass the constructor, as a stale cache might
    with ocp.StandardCheckpointer() as ckpt, pytest.raises(ValueError, match=r"QuantizedTensor.packed should be"):
        ckpt.restore(tmp_path / "ckpt", tampered)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(quant_type="nf5"), r"quant_type must be one of \('nf4', 'fp4', 'int4'\); got 'nf5'"),
        (dict(block_size=48), r"block_size must be one of \(32, 64, .*4096\); got 48"),
        (dict(block_size=8192), "block_size must be one of"),
        (dict(nested_block_size=100), "nested_block_size must be one of"),
    ],
)
def test_bad_options_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quant.quantize(_weights(), **kwargs)


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.bool_, np.float64, np.complex64])
def test_non_float_dtypes_raise(dtype):
    with pytest.raises(
        ValueError, match=r"w\.dtype must be a float dtype, one of \('float32', 'bfloat16', 'float16'\)"
    ):
        quant.quantize(np.zeros((4, 64), dtype), name="w")


def test_empty_tensor_raises():
    with pytest.raises(ValueError, match=r"q_proj is empty \(shape \(0, 64\)\)"):
        quant.quantize(np.zeros((0, 64), f32), name="q_proj")


def test_bad_dequantize_dtype_raises():
    with pytest.raises(ValueError, match="dtype must be a float dtype"):
        quant.dequantize(quant.quantize(_weights()), jnp.int8)
    with pytest.raises(ValueError, match="expects a QuantizedTensor"):
        quant.dequantize(_weights())


def test_finite_input_never_dequantizes_to_nan():
    x = _weights((16, 256))
    x[0] = 0.0  # all-zero blocks
    x[1, :] = 1e-30  # tiny blocks
    x[2, :64] = 60000.0
    for quant_type in ("nf4", "fp4", "int4"):
        for dq in (False, True):
            y = np.asarray(quant.dequantize(quant.quantize(x, quant_type, 64, dq), jnp.float32))
            assert np.all(np.isfinite(y)), (quant_type, dq)
            np.testing.assert_array_equal(y[0], 0.0)


def test_check_finite_reports_count_and_position():
    x = _weights((8, 64))
    x[2, 5] = np.nan
    x[3, 0] = np.inf
    x[7, 63] = -np.inf
    expected = (
        r"o_proj has 3 non-finite values of 512 \(NaN: 1, \+Inf: 1, -Inf: 1\); "
        r"first at indices \[\(2, 5\), \(3, 0\), \(7, 63\)\]"
    )
    with pytest.raises(ValueError, match=expected):
        quant.check_finite(x, name="o_proj")
    with pytest.raises(ValueError, match="o_proj has 3 non-finite"):
        quant.quantize(x, check_finite=True, name="o_proj")
    quant.check_finite(_weights())  # finite: no error


def test_check_finite_inside_jit_says_to_call_it_outside():
    with pytest.raises(ValueError, match="needs concrete values"):
        jax.jit(lambda w: quant.quantize(w, check_finite=True).packed)(_weights())


@pytest.mark.parametrize(
    "shape, dtype",
    [((4, 128), np.float32), ((64, 64), np.float32), ((256, 256), jnp.bfloat16), ((1024, 96), np.float32)],
)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_without_check_poisons_blocks_as_documented(shape, bad, dtype):
    """A NaN or ±Inf turns its whole block into NaN, and with double quantization the whole tensor:
    at every size (XLA CPU's reduce-max dropped NaN from 64 rows up) and for every type."""
    x = _weights(shape)
    pos = x.size // 2 + 3  # an element inside some block, not the first one
    x.reshape(-1)[pos] = bad
    x = x.astype(dtype)
    block = pos // 64
    for quant_type in ("nf4", "fp4", "int4"):
        y = np.asarray(quant.dequantize(quant.quantize(x, quant_type, 64, False), jnp.float32)).reshape(-1)
        assert np.all(np.isnan(y[block * 64 : (block + 1) * 64])), quant_type
        assert np.isfinite(np.delete(y, np.s_[block * 64 : (block + 1) * 64])).all(), quant_type
        y = np.asarray(quant.dequantize(quant.quantize(x, quant_type, 64, True), jnp.float32))
        assert np.all(np.isnan(y)), quant_type  # double quant: the shared offset carries NaN to every block


@pytest.mark.parametrize("n", [100, 65536, 1 << 20])
def test_8bit_blockwise_absmax_propagates_nan(n):
    from qlora_jax.quant import blockwise

    x = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    x[n - 7] = np.nan
    codes, absmax = blockwise.quantize_blockwise_8bit(jnp.asarray(x), codebooks.DYNAMIC_SIGNED, 256)
    y = np.asarray(blockwise.dequantize_blockwise_8bit(codes, absmax, codebooks.DYNAMIC_SIGNED, 256))
    bad = (n - 7) // 256
    assert np.isnan(np.asarray(absmax)).sum() == 1 and np.isnan(np.asarray(absmax)[bad])
    assert np.all(np.isnan(y[bad * 256 : (bad + 1) * 256]))


@pytest.mark.parametrize("block_size, dq", [(64, True), (64, False), (128, True), (4096, False)])
def test_bits_per_param_formula_matches_stored_bytes(block_size, dq):
    n = 1 << 20  # a whole number of blocks and nested blocks: only the offset is left over
    qt = quantize(jnp.ones((n,), jnp.float32), "nf4", block_size, dq, 256)
    offset_bits = 32 / n if dq else 0.0
    assert qt.bits_per_param == pytest.approx(bits_per_param(block_size, dq, 256) + offset_bits, rel=1e-12)
    assert bits_per_param(64, True, 256) == 4 + 1 / 8 + 1 / 512  # the paper's 4.127


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_quantization_error_equals_nearest_code_in_float64(quant_type):
    x = np.random.default_rng(3).standard_normal((64, 256)).astype(np.float32)
    got = quantization_error(x, quant_type, 64, double_quant=False)
    blocks = x.reshape(-1, 64).astype(np.float64)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    table = np.asarray(codebooks.table(quant_type), np.float64)
    scaled = blocks / absmax
    nearest = table[np.argmin(np.abs(scaled[..., None] - table), axis=-1)] * absmax
    err = nearest - blocks
    assert got["rel_mse"] == pytest.approx(np.sum(err**2) / np.sum(blocks**2), rel=1e-5)
    assert got["max_abs_err"] == pytest.approx(np.abs(err).max(), rel=1e-5)
    with pytest.raises(ValueError, match="all zeros"):
        quantization_error(np.zeros((64,), np.float32))
