"""4-bit kernels: Pallas (Triton; a Mosaic GPU prototype) on GPU, interpret mode on CPU, pure-jnp references everywhere.

from qlora_jax import kernels
w = kernels.dequantize(qt, dtype=jnp.bfloat16)     # [out, in]
y = kernels.qmatmul(x, qt)                         # x: [..., in] -> [..., out]
choice = kernels.for_device()                      # a Dispatch: what this device runs, per M
y = kernels.qmatmul(x, qt, impl=choice)            # the same as impl="auto", chosen once up front
"""

from qlora_jax.kernels._common import DECODE_MAX_M
from qlora_jax.kernels.decode import DecodeBlockSizes
from qlora_jax.kernels.dequantize import DequantizeBlockSizes, dequantize, dequantize_reference
from qlora_jax.kernels.dispatch import Dispatch, for_device
from qlora_jax.kernels.qmatmul import QMatmulBlockSizes, choose_impl, qmatmul, qmatmul_reference

__all__ = [
    "DECODE_MAX_M",
    "DecodeBlockSizes",
    "DequantizeBlockSizes",
    "Dispatch",
    "QMatmulBlockSizes",
    "choose_impl",
    "dequantize",
    "dequantize_reference",
    "for_device",
    "qmatmul",
    "qmatmul_reference",
]
