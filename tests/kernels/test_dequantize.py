"""Pallas dequantize kernel (interpret mode on CPU) against the pure-jnp reference: exactly equal."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_config import INTERPRET, run_poisoned

from qlora_jax import kernels, quant
from qlora_jax.kernels import dispatch
from qlora_jax.kernels.dequantize import DequantizeBlockSizes, _dequantize_call, kernel_supports


def _qt(rng, shape, quant_type, dq, block_size=64):
    w = (rng.standard_normal(shape) * rng.uniform(0.005, 0.5)).astype(np.float32)
    w.reshape(-1)[: block_size * 2] = 0.0  # two all-zero blocks
    return quant.quantize(w, quant_type, block_size, dq)


# 256 blocks in tiles of 64, steps of 16: a grid of 4 programs, each looping over 4 steps
SMALL = DequantizeBlockSizes(blocks_per_tile=64, blocks_per_step=16)


@pytest.mark.parametrize("lookup", ["table", "select"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_kernel_equals_reference(fresh_rng, quant_type, dq, dtype, lookup):
    qt = _qt(fresh_rng, (64, 256), quant_type, dq)
    bs = dataclasses.replace(SMALL, lookup=lookup)
    y = run_poisoned(_dequantize_call(qt, dtype, bs, INTERPRET))
    ref = kernels.dequantize_reference(qt, dtype)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(ref, np.float32))


@pytest.mark.parametrize("shape,block_size", [((4096,), 128), ((3, 8, 128), 32), ((48, 64), 64)])
def test_kernel_shapes_and_partial_tiles(fresh_rng, shape, block_size):
    # (48, 64) at block 64 is 48 blocks: the tile shrinks to 16 so every tile is full.
    qt = _qt(fresh_rng, shape, "nf4", True, block_size)
    y = kernels.dequantize(qt, jnp.bfloat16, impl="pallas", interpret=INTERPRET)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(quant.dequantize(qt, jnp.bfloat16), np.float32))


def test_small_tile_setting(fresh_rng):
    qt = _qt(fresh_rng, (32, 128), "fp4", True)
    y = kernels.dequantize(
        qt, jnp.float32, impl="pallas", interpret=INTERPRET, block_sizes=DequantizeBlockSizes(blocks_per_tile=16)
    )
    np.testing.assert_array_equal(np.asarray(y), np.asarray(quant.dequantize(qt, jnp.float32)))


def test_auto_uses_reference_off_gpu_and_for_unsupported_shapes(fresh_rng):
    odd = quant.quantize(fresh_rng.standard_normal(1001).astype(np.float32), "nf4", 64, True)
    assert not kernel_supports(odd)
    y = kernels.dequantize(odd, jnp.bfloat16)  # auto: the reference takes it
    np.testing.assert_array_equal(
        np.asarray(y, np.float32), np.asarray(quant.dequantize(odd, jnp.bfloat16), np.float32)
    )
    with pytest.raises(ValueError, match="multiple of block_size"):
        kernels.dequantize(odd, impl="pallas", interpret=True)


def test_default_tiling_equals_reference(fresh_rng):
    # 1024 blocks: the default 256-block tiles (4 programs) in 8 steps of 32
    qt = _qt(fresh_rng, (256, 256), "nf4", True)
    y = run_poisoned(_dequantize_call(qt, "bfloat16", DequantizeBlockSizes(), INTERPRET))
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(quant.dequantize(qt, jnp.bfloat16), np.float32))


def test_poison_shows_a_tile_the_kernel_skips(fresh_rng):
    """The poisoned-output check itself: the kernel launched on a grid one program short fails it."""
    call = _dequantize_call(_qt(fresh_rng, (64, 256), "nf4", True), "bfloat16", SMALL, INTERPRET)
    assert call.params["grid"] == (4,)
    with pytest.raises(AssertionError, match=r"4096 of 16384 output elements are NaN"):
        run_poisoned(dataclasses.replace(call, params={**call.params, "grid": (3,)}))


def _runs(f, *args) -> str:
    """Which dequantize ``f`` traces to: the kernel's name, else "xla"."""
    jaxpr = str(jax.make_jaxpr(f)(*args))
    for name in ("dequantize_mosaic", "dequantize_nf4"):
        if name in jaxpr:
            return name
    assert "pallas_call" not in jaxpr
    return "xla"


def test_a_dispatch_chooses_and_falls_back_for_shapes_the_kernel_does_not_take(fresh_rng):
    big = _qt(fresh_rng, (64, 256), "nf4", True)  # 256 blocks
    few = _qt(fresh_rng, (8, 64), "nf4", True)  # 8 blocks: under the kernel's 16
    pallas = dispatch.Dispatch(dequantize="pallas")
    assert _runs(lambda q: kernels.dequantize(q, impl=pallas, interpret=INTERPRET), big) == "dequantize_nf4"
    assert _runs(lambda q: kernels.dequantize(q, impl=pallas, interpret=INTERPRET), few) == "xla"
    assert _runs(lambda q: kernels.dequantize(q, impl=dispatch.XLA), big) == "xla"
    with pytest.raises(ValueError, match="at least 16 blocks"):
        kernels.dequantize(few, impl="pallas", interpret=INTERPRET)  # a name is taken at its word


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(blocks_per_step=24), r"blocks_per_step must be a positive power of two; got 24"),
        (dict(num_stages=0), r"num_stages must be a positive int; got 0"),
        (dict(lookup="gather"), r"lookup must be one of \('table', 'select'\); got 'gather'"),
    ],
)
def test_bad_block_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DequantizeBlockSizes(**kwargs)


def test_bad_arguments():
    qt = quant.quantize(np.ones((16, 64), np.float32))
    with pytest.raises(ValueError, match="impl must be one of"):
        kernels.dequantize(qt, impl="cuda")
    with pytest.raises(ValueError, match="dtype must be one of"):
        kernels.dequantize(qt, jnp.int8)
