"""How the kernel tests run here: interpret mode on CPU, compiled kernels on a GPU.

QLORA_JAX_INTERPRET=0 forces compiled kernels (tools/gpu_check.sh sets it on a lent GPU);
=1 forces interpret mode. Default: interpret unless the default backend is a GPU.
"""

import os

import jax
import jax.numpy as jnp

_env = os.environ.get("QLORA_JAX_INTERPRET")
INTERPRET = (jax.default_backend() != "gpu") if _env is None else _env != "0"

# Relative Frobenius error of a matmul against a float64 product of the same (dequantized)
# operands, by operand dtype: bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3 on the
# weight tile and on the output), fp16 keeps 11 (2^-12 ~ 2.4e-4).
MATMUL_RTOL = {jnp.bfloat16: 1e-2, jnp.float16: 2e-3}
