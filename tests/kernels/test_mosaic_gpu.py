"""Mosaic GPU dequantize prototype: bit-identical to the reference in Mosaic GPU interpret mode, lowers for CUDA.

On CPU every kernel test runs in Mosaic GPU interpret mode (``plgpu.InterpretGPUParams``), which
starts the output as NaN (all-ones for the u32 words of 16-bit results), so an element the kernel
never writes fails the comparison. The interpreter's own behaviour that this relies on is pinned
by the ``test_interpreter_*`` tests. The lowering tests export for CUDA from the CPU: they prove the
kernel passes Mosaic GPU's Python lowering (layouts, TMA rules, SMEM size), not that PTX builds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from kernel_config import INTERPRET

from qlora_jax import quant
from qlora_jax.kernels.mosaic_gpu import MosaicTiling, dequantize_mosaic, kernel_supports

MODE = plgpu.InterpretGPUParams() if INTERPRET else False
# 64x256 at block 64 is 256 blocks: 2 CTAs, each 2 row steps x 2 column steps through 3 stages, so
# step 3 reuses slot 0 (the wait for its previous TMA store).
SMALL = dict(rows_per_tile=128, rows_per_step=64, cols_per_step=16)
_H100 = jax.sharding.AbstractMesh(
    (1,), ("x",), abstract_device=jax.sharding.AbstractDevice("NVIDIA H100 80GB HBM3", 132, "gpu")
)


def _qt(rng, shape, quant_type, dq, block_size=64, nested_block_size=256):
    """A tensor whose blocks have absmax spread over three decades, so a block read with another block's scale
    cannot pass; the first two blocks are all zero."""
    n = int(np.prod(shape))
    w = rng.standard_normal((n // block_size, block_size)) * 10 ** rng.uniform(-3, 0, (n // block_size, 1))
    w[:2] = 0.0
    return quant.quantize(w.reshape(shape).astype(np.float32), quant_type, block_size, dq, nested_block_size)


def _assert_bit_identical(y, qt, dtype):
    ref = quant.dequantize(qt, dtype)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    bits = {2: np.uint16, 4: np.uint32}[ref.dtype.itemsize]
    np.testing.assert_array_equal(np.asarray(y).view(bits), np.asarray(ref).view(bits))


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_bf16_equals_reference(fresh_rng, quant_type, dq):
    # nested blocks of 64: each 128-block tile spans two nested scales
    qt = _qt(fresh_rng, (64, 256), quant_type, dq, nested_block_size=64)
    _assert_bit_identical(dequantize_mosaic(qt, "bfloat16", interpret=MODE, **SMALL), qt, "bfloat16")


@pytest.mark.parametrize(
    "quant_type,dq,dtype", [("fp4", True, "float32"), ("nf4", True, "float32"), ("int4", False, "float16")]
)
def test_other_dtypes_equal_reference(fresh_rng, quant_type, dq, dtype):
    # nested blocks of 256: a tile inside one nested block
    qt = _qt(fresh_rng, (64, 256), quant_type, dq)
    _assert_bit_identical(dequantize_mosaic(qt, dtype, interpret=MODE, **SMALL), qt, dtype)


@pytest.mark.parametrize(
    "shape,block_size,kwargs",
    [
        ((128, 512), 64, {}),  # default tiling: 4 CTAs of 256 blocks, 4 steps each
        ((128, 4096), 4096, {}),  # 128 blocks of 2048 bytes: 2 x 32 sub-tiles of 64x64 bytes
        ((64, 512), 32, dict(rows_per_tile=256, rows_per_step=128, num_stages=1)),  # block 32: rows of 16 bytes
    ],
)
def test_other_shapes_and_tilings(fresh_rng, shape, block_size, kwargs):
    qt = _qt(fresh_rng, shape, "nf4", True, block_size)
    _assert_bit_identical(dequantize_mosaic(qt, "bfloat16", interpret=MODE, **kwargs), qt, "bfloat16")


def test_unsupported_shapes_and_tilings_raise(fresh_rng):
    partial = quant.quantize(fresh_rng.standard_normal(1001).astype(np.float32), "nf4", 64, True)
    few = _qt(fresh_rng, (64, 64), "nf4", True)  # 64 blocks: not a multiple of 128
    for qt in (partial, few):
        assert not kernel_supports(qt)
        with pytest.raises(ValueError, match="multiple of 128"):
            dequantize_mosaic(qt, interpret=MODE)
    ok = _qt(fresh_rng, (256, 512), "nf4", False, block_size=512)  # 256 rows of 256 bytes: 8 column steps
    assert kernel_supports(ok) and kernel_supports(ok, "float32")
    big = dict(rows_per_tile=256, rows_per_step=256, cols_per_step=32, num_stages=4)
    # 4 stages x 256x32 bytes x (1 in + 4 out) fit in SMEM, x (1 + 8) for float32 do not
    assert kernel_supports(ok, "bfloat16", MosaicTiling(**big)) and not kernel_supports(
        ok, "float32", MosaicTiling(**big)
    )
    with pytest.raises(ValueError, match="SMEM"):
        dequantize_mosaic(ok, "float32", interpret=MODE, **big)
    with pytest.raises(ValueError, match="rows_per_step"):
        dequantize_mosaic(ok, interpret=MODE, rows_per_step=32)
    with pytest.raises(ValueError, match="dtype"):
        dequantize_mosaic(ok, jnp.int8, interpret=MODE)


# --- What Mosaic GPU interpret mode does with bad kernels (jax 0.11.2) ---------------------------------------------


def _interpret(body, out_shape, grid=(), scratch=()):
    return plgpu.kernel(
        body,
        out_type=out_shape,
        grid=grid,
        grid_names=("g",) if grid else (),
        scratch_types=list(scratch),
        interpret=plgpu.InterpretGPUParams(),
    )


def test_interpreter_fills_unwritten_output_with_nan_or_all_ones():
    def half(x_ref, o_ref):
        o_ref[pl.ds(0, 128)] = x_ref[pl.ds(0, 128)]

    y = np.asarray(_interpret(half, jax.ShapeDtypeStruct((256,), jnp.float32))(jnp.ones(256, jnp.float32)))
    assert (y[:128] == 1).all() and np.isnan(y[128:]).all()
    y = np.asarray(_interpret(half, jax.ShapeDtypeStruct((256,), jnp.uint32))(jnp.ones(256, jnp.uint32)))
    assert (y[:128] == 1).all() and (y[128:] == 0xFFFFFFFF).all()  # as two bf16 halves: two NaNs


def test_interpreter_raises_on_out_of_bounds_register_load():
    def shifted(x_ref, o_ref):  # CTA 1 reads x[192:320] of 256
        i = jax.lax.axis_index("g")
        o_ref[pl.ds(i * 128, 128)] = x_ref[pl.ds(i * 128 + 64, 128)]

    f = _interpret(shifted, jax.ShapeDtypeStruct((256,), jnp.float32), grid=(2,))
    try:
        with pytest.raises(Exception, match="Out-of-bounds read"):
            np.asarray(f(jnp.arange(256, dtype=jnp.float32)))
    finally:  # the interpreter's global state must be reset after an exception
        interpret_pallas_call.reset_gpu_interpret_mode_state()


def test_interpreter_tma_load_out_of_bounds_reads_zeros_without_raising():
    # as the hardware: so a wrong TMA window shows up as zeros or unwritten NaN, never as an error
    def shifted(x_ref, o_ref, smem, barrier):
        i = jax.lax.axis_index("g")
        plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(i * 128 + 64, 128)], smem, barrier.at[0])
        plgpu.barrier_wait(barrier.at[0])
        o_ref[pl.ds(i * 128, 128)] = smem[...]

    scratch = (plgpu.SMEM((128,), jnp.float32), plgpu.Barrier(num_barriers=1))
    f = _interpret(shifted, jax.ShapeDtypeStruct((256,), jnp.float32), grid=(2,), scratch=scratch)
    y = np.asarray(f(jnp.arange(1, 257, dtype=jnp.float32)))
    np.testing.assert_array_equal(y[128:192], np.arange(193, 257))
    assert (y[192:] == 0).all()


# --- Lowering for CUDA from the CPU ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "quant_type,dq,dtype,block_size",
    [("nf4", True, "bfloat16", 64), ("fp4", False, "float32", 64), ("int4", True, "float16", 128)],
)
def test_lowers_for_cuda(quant_type, dq, dtype, block_size):
    qt = jax.eval_shape(lambda: quant.quantize(jnp.zeros((4096, 4096), jnp.bfloat16), quant_type, block_size, dq))
    with jax.sharding.use_abstract_mesh(_H100):
        exported = export.export(jax.jit(lambda q: dequantize_mosaic(q, dtype)), platforms=["cuda"])(qt)
    assert "mosaic_gpu_v2" in exported.mlir_module()
    assert exported.out_avals[0].shape == (4096, 4096) and exported.out_avals[0].dtype == jnp.dtype(dtype)


def test_public_dequantize_runs_it_when_named_or_dispatched(fresh_rng):
    from qlora_jax import kernels
    from qlora_jax.kernels import dispatch

    qt = _qt(fresh_rng, (128, 256), "nf4", True)
    y = kernels.dequantize(qt, jnp.bfloat16, impl="mosaic_gpu", interpret=INTERPRET)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(quant.dequantize(qt, jnp.bfloat16), np.float32))
    hopper = type("Device", (), {"platform": "gpu", "device_kind": "NVIDIA H100 80GB HBM3"})()
    choice = dispatch.for_device(hopper, {"devices": {hopper.device_kind: {"dequantize": "mosaic_gpu"}}})
    assert choice == dispatch.Dispatch(dequantize="mosaic_gpu")

    def runs(q):
        return str(jax.make_jaxpr(lambda q: kernels.dequantize(q, jnp.bfloat16, impl=choice, interpret=INTERPRET))(q))

    assert "name=dequantize_mosaic_nf4_dq_bfloat16" in runs(qt)
    # 64 blocks are not a multiple of 128: the Mosaic kernel does not take them, the Triton one does
    few = _qt(fresh_rng, (64, 64), "nf4", True)
    assert "dequantize_mosaic" not in runs(few) and "name=dequantize_nf4_dq_table" in runs(few)
