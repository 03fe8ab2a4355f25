"""Numerics core: NF4/FP4/int4 block-wise quantization and double quantization, bnb-exact.

from qlora_jax import quant
qt = quant.quantize(w, quant_type="nf4", block_size=64, double_quant=True)
w_hat = quant.dequantize(qt, dtype=jnp.bfloat16)
sd = quant.to_bnb_state_dict(qt, prefix="model.layers.0.mlp.up_proj.weight")
"""

from qlora_jax.quant import blockwise, codebooks
from qlora_jax.quant.tensor import (
    BNB_ARRAYS,
    QuantizedTensor,
    bits_per_param,
    block_absmax,
    bnb_layout,
    check_finite,
    dequantize,
    from_bnb_state_dict,
    is_quantized,
    measure_error,
    quantization_error,
    quantize,
    to_bnb_state_dict,
)

__all__ = [
    "BNB_ARRAYS",
    "QuantizedTensor",
    "bits_per_param",
    "block_absmax",
    "blockwise",
    "bnb_layout",
    "check_finite",
    "codebooks",
    "dequantize",
    "from_bnb_state_dict",
    "is_quantized",
    "measure_error",
    "quantization_error",
    "quantize",
    "to_bnb_state_dict",
]
