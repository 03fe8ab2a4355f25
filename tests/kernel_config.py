"""How the kernel tests run here: interpret mode on CPU, compiled kernels on a GPU; the poisoned-output check.

QLORA_JAX_INTERPRET=0 forces compiled kernels (tools/gpu_check.sh sets it on a lent GPU);
=1 forces interpret mode. Default: interpret unless the default backend is a GPU.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

_env = os.environ.get("QLORA_JAX_INTERPRET")
INTERPRET = (jax.default_backend() != "gpu") if _env is None else _env != "0"

# Relative Frobenius error of a matmul against a float64 product of the same (dequantized)
# operands, by operand dtype: bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3 on the
# weight tile and on the output), fp16 keeps 11 (2^-12 ~ 2.4e-4).
MATMUL_RTOL = {jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


def run_poisoned(call):
    """Launch a kernel's unlaunched ``PallasCall`` (``qlora_jax.kernels._common``) with its output
    starting as NaN, assert the kernel wrote every element, and return the finished result.

    The NaN buffer is an extra input aliased to the output, so whatever the kernel leaves
    unwritten keeps its poison on GPU and in interpret mode alike (a fresh output buffer may hold
    anything, zeros included, which a comparison could pass).
    """
    out = call.params["out_shape"]
    poison = jnp.full(out.shape, jnp.nan, out.dtype)

    def without_poison_ref(*refs):  # the aliased input's ref is the output's memory: not the kernel's
        *ins, _poison, o_ref = refs
        call.kernel(*ins, o_ref)

    params = dict(
        call.params,
        in_specs=[*call.params["in_specs"], pl.no_block_spec],
        input_output_aliases={len(call.args): 0},
    )
    raw = pl.pallas_call(without_poison_ref, **params)(*call.args, poison)
    unwritten = int(np.isnan(np.asarray(raw, np.float32)).sum())
    assert unwritten == 0, (
        f"{params['name']}: {unwritten} of {raw.size} output elements are NaN: never written (the poison) "
        "or computed NaN"
    )
    return call.finish(raw)
