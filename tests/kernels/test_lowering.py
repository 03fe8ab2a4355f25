"""Every kernel lowers for CUDA through Triton, checked from the CPU with jax.export.

This proves the kernels reach Triton IR with no primitive the Triton lowering lacks (no
gather, for example); it cannot prove that PTX compiles or runs (tools/gpu_check.sh does).
"""

import jax
import jax.numpy as jnp
import pytest
from jax import export

from qlora_jax import quant
from qlora_jax.kernels.decode import DecodeBlockSizes, decode_partials
from qlora_jax.kernels.dequantize import DequantizeBlockSizes, dequantize_pallas
from qlora_jax.kernels.qmatmul import QMatmulBlockSizes, qmatmul_bwd_pallas, qmatmul_fwd_pallas

_H100 = jax.sharding.AbstractMesh(
    (1,), ("x",), abstract_device=jax.sharding.AbstractDevice("NVIDIA H100 80GB HBM3", 132, "gpu")
)
TRITON = "__gpu$xla.gpu.triton"


def _export_for_cuda(fn, *args):
    with jax.sharding.use_abstract_mesh(_H100):
        exported = export.export(
            jax.jit(fn), platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)]
        )(*args)
    text = exported.mlir_module()
    assert TRITON in text
    return text


def _abstract_weight(shape, quant_type, dq, block_size=64):
    return jax.eval_shape(lambda: quant.quantize(jnp.zeros(shape, jnp.bfloat16), quant_type, block_size, dq))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_dequantize_lowers(quant_type, dq, dtype):
    qt = _abstract_weight((4096, 4096), quant_type, dq)
    _export_for_cuda(lambda q: dequantize_pallas(q, dtype), qt)


def test_dequantize_select_lookup_lowers():
    qt = _abstract_weight((4096, 4096), "nf4", True)
    _export_for_cuda(lambda q: dequantize_pallas(q, "bfloat16", block_sizes=DequantizeBlockSizes(lookup="select")), qt)


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_decode_kernel_lowers(m, shape):
    qt = _abstract_weight(shape, "nf4", True)
    x = jax.ShapeDtypeStruct((m, shape[1]), jnp.bfloat16)
    _export_for_cuda(lambda x, q: decode_partials(x, q), x, qt)


@pytest.mark.parametrize("quant_type,dq,dtype", [("fp4", False, jnp.float16), ("int4", True, jnp.float32)])
def test_decode_kernel_other_types_lower(quant_type, dq, dtype):
    qt = _abstract_weight((4096, 4096), quant_type, dq, block_size=128)
    sizes = DecodeBlockSizes(block_n=128, blocks_per_step=2)
    _export_for_cuda(lambda x, q: decode_partials(x, q, sizes), jax.ShapeDtypeStruct((3, 4096), dtype), qt)


@pytest.mark.parametrize("m", [1, 16, 512, 4096])
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_qmatmul_forward_and_backward_lower(m, shape):
    qt = _abstract_weight(shape, "nf4", True)
    bs = QMatmulBlockSizes.for_shape(m, shape[0])
    x = jax.ShapeDtypeStruct((m, shape[1]), jnp.bfloat16)
    dy = jax.ShapeDtypeStruct((m, shape[0]), jnp.bfloat16)
    _export_for_cuda(lambda x, q: qmatmul_fwd_pallas(x, q, bs, False), x, qt)
    _export_for_cuda(lambda dy, q: qmatmul_bwd_pallas(dy, q, bs, False), dy, qt)


@pytest.mark.parametrize("quant_type,dq,dtype", [("fp4", False, jnp.float16), ("int4", True, jnp.bfloat16)])
def test_qmatmul_other_types_lower(quant_type, dq, dtype):
    qt = _abstract_weight((4096, 4096), quant_type, dq, block_size=128)
    bs = QMatmulBlockSizes.for_shape(7, 4096)
    _export_for_cuda(lambda x, q: qmatmul_fwd_pallas(x, q, bs, False), jax.ShapeDtypeStruct((7, 4096), dtype), qt)
