"""Split-K decode kernel (M <= 16) against float64 products of the dequantized weight."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_config import INTERPRET, MATMUL_RTOL, run_poisoned

from qlora_jax import kernels, quant
from qlora_jax.kernels import decode
from qlora_jax.kernels.decode import DecodeBlockSizes, _decode_call, decode_partials

N, K = 64, 768  # 12 blocks of 64 along K


def _weight(rng, quant_type="nf4", dq=True, shape=(N, K), block_size=64):
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    return quant.quantize(w, quant_type, block_size, dq)


def _want(x, qt):
    return np.asarray(x, np.float64) @ np.asarray(quant.dequantize(qt, jnp.float32), np.float64).T


def _rel_err(got, want):
    return np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize(
    "quant_type,dq,dtype",
    [
        ("nf4", True, jnp.bfloat16),
        ("nf4", False, jnp.float16),
        ("fp4", True, jnp.float16),
        ("int4", False, jnp.bfloat16),
    ],
)
def test_partials_sum_to_the_float64_product(fresh_rng, quant_type, dq, dtype, m):
    """Float32 partials (before the cast to x's dtype) against float64: only float32 rounding.
    blocks_per_step=4, splits=2 over 3 steps: the second split runs one step (an uneven split)."""
    qt = _weight(fresh_rng, quant_type, dq)
    x = jnp.asarray(fresh_rng.standard_normal((m, K)), dtype)
    sizes = DecodeBlockSizes(block_n=32, blocks_per_step=4, splits=2)
    assert sizes.for_shape(N, K, 64).splits == 2
    partials = run_poisoned(_decode_call(x, qt, sizes, INTERPRET))
    assert partials.shape == (2, m, N)
    assert _rel_err(np.asarray(partials, np.float64).sum(0), _want(x, qt)) <= 1e-5


@pytest.mark.parametrize("m", [1, 3])
def test_public_qmatmul_decode(fresh_rng, m):
    qt = _weight(fresh_rng, "nf4", True, (N, 512), block_size=128)
    x = jnp.asarray(fresh_rng.standard_normal((1, m, 512)), jnp.bfloat16)
    y = kernels.qmatmul(x, qt, impl="pallas_decode", interpret=INTERPRET)
    assert y.shape == (1, m, N) and y.dtype == jnp.bfloat16
    assert _rel_err(y[0], _want(x[0], qt)) <= MATMUL_RTOL[jnp.bfloat16]
    # the backward (the XLA path) still gives dx of the frozen-weight product
    dx = jax.grad(
        lambda x: kernels.qmatmul(x, qt, impl="pallas_decode", interpret=INTERPRET).astype(jnp.float32).sum()
    )(x)
    want_dx = np.ones((m, N)) @ np.asarray(quant.dequantize(qt, jnp.float32), np.float64)
    assert _rel_err(dx[0], want_dx) <= MATMUL_RTOL[jnp.bfloat16]


@pytest.mark.parametrize(
    "n,k", [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336), (128256, 4096), (64, 768)]
)
def test_splits_cover_k_once_and_fill_the_machine(n, k):
    sizes = DecodeBlockSizes().for_shape(n, k, 64)
    blocks_per_row = k // 64
    assert n % sizes.block_n == 0 and blocks_per_row % sizes.blocks_per_step == 0
    steps = blocks_per_row // sizes.blocks_per_step
    per_split = math.ceil(steps / sizes.splits)
    runs = [range(s * per_split, min((s + 1) * per_split, steps)) for s in range(sizes.splits)]
    assert sorted(t for r in runs for t in r) == list(range(steps))  # every step once
    assert all(len(r) >= 1 for r in runs)  # no idle split
    programs = n // sizes.block_n * sizes.splits
    assert programs >= min(decode.TARGET_PROGRAMS, n // sizes.block_n * max(1, steps // 2)) // 2
    assert steps // sizes.splits >= min(2, steps)  # steps left to pipeline in each split


def test_bad_input_is_named(fresh_rng):
    qt = _weight(fresh_rng)
    with pytest.raises(ValueError, match=r"impl='pallas_decode' takes 1..16 rows of x .* got x \(17, 768\)"):
        kernels.qmatmul(jnp.ones((17, K), jnp.bfloat16), qt, impl="pallas_decode")
    with pytest.raises(ValueError, match=r"the decode kernel takes 1..16 rows .* got x \(2, 512\)"):
        decode_partials(jnp.ones((2, 512), jnp.bfloat16), qt)
    with pytest.raises(ValueError, match=r"DecodeBlockSizes.block_n must be a positive power of two; got 48"):
        DecodeBlockSizes(block_n=48)
    with pytest.raises(ValueError, match=r"DecodeBlockSizes.splits must be a positive int or None; got 0"):
        DecodeBlockSizes(splits=0)
