"""8-bit Adam: moments stored as block-wise dynamic-map codes, as bitsandbytes' 8-bit optimizers.

Each moment tensor of at least ``min_8bit_size`` (4096) elements is stored as uint8 codes plus a
float32 absmax per block of 256: the first moment ``m`` with the signed dynamic map, the second
``v`` (never negative) with the unsigned one; smaller tensors stay float32. Each step
dequantizes, applies the Adam recursion in float32, computes the update from those float32
moments, and requantizes them (exact nearest code, ties to the lower code). State bytes are about
2/8 of float32 Adam's. Nothing like it exists in optax.

The state keeps codes in params-shaped trees, so :func:`qlora_jax.optim.paged` pages them too.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from qlora_jax.quant import blockwise, codebooks

BLOCK = 256
DYNAMIC_UNSIGNED = codebooks.dynamic_map(signed=False)


class ScaleByAdam8bitState(NamedTuple):
    """``mu``/``nu``: per parameter, uint8 codes (param-shaped) or the float32 moment itself for
    small tensors; ``mu_absmax``/``nu_absmax``: float32 per block of 256 (empty when float32)."""

    count: jax.Array
    mu: optax.Updates
    mu_absmax: optax.Updates
    nu: optax.Updates
    nu_absmax: optax.Updates


def quantize_moment(x: jax.Array, signed: bool) -> tuple[jax.Array, jax.Array]:
    """float32 tensor -> (uint8 codes of x's shape, float32 absmax per 256-element block)."""
    table = codebooks.DYNAMIC_SIGNED if signed else DYNAMIC_UNSIGNED
    codes, absmax = blockwise.quantize_blockwise_8bit(x, table, BLOCK)
    return codes.reshape(x.shape), absmax


def dequantize_moment(codes: jax.Array, absmax: jax.Array, signed: bool) -> jax.Array:
    table = codebooks.DYNAMIC_SIGNED if signed else DYNAMIC_UNSIGNED
    return blockwise.dequantize_blockwise_8bit(codes.reshape(-1), absmax, table, BLOCK).reshape(codes.shape)


def scale_by_adam_8bit(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, min_8bit_size: int = 4096
) -> optax.GradientTransformation:
    """Adam's scaling with 8-bit block-wise moments (bitsandbytes' ``Adam8bit`` semantics)."""

    def small(p) -> bool:
        return p.size < min_8bit_size

    def init_fn(params):
        def zeros(p, signed):
            if small(p):
                return jnp.zeros(p.shape, jnp.float32), jnp.zeros((0,), jnp.float32)
            return quantize_moment(jnp.zeros(p.shape, jnp.float32), signed)

        mu = jax.tree.map(lambda p: zeros(p, True), params)
        nu = jax.tree.map(lambda p: zeros(p, False), params)
        first = lambda t: jax.tree.map(lambda pair: pair[0], t, is_leaf=lambda x: isinstance(x, tuple))  # noqa: E731
        second = lambda t: jax.tree.map(lambda pair: pair[1], t, is_leaf=lambda x: isinstance(x, tuple))  # noqa: E731
        return ScaleByAdam8bitState(jnp.zeros([], jnp.int32), first(mu), second(mu), first(nu), second(nu))

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_int32_increment(state.count)
        c1 = 1 - b1 ** count.astype(jnp.float32)
        c2 = 1 - b2 ** count.astype(jnp.float32)

        def one(g, mu, mu_absmax, nu, nu_absmax):
            g = g.astype(jnp.float32)
            quantized = mu.dtype == jnp.uint8
            m = dequantize_moment(mu, mu_absmax, True) if quantized else mu
            v = dequantize_moment(nu, nu_absmax, False) if quantized else nu
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            step = (m / c1) / (jnp.sqrt(v / c2) + eps)
            if quantized:
                (mu, mu_absmax), (nu, nu_absmax) = quantize_moment(m, True), quantize_moment(v, False)
            else:
                mu, nu = m, v
            return step, mu, mu_absmax, nu, nu_absmax

        out = jax.tree.map(one, updates, state.mu, state.mu_absmax, state.nu, state.nu_absmax)
        pick = lambda k: jax.tree.map(lambda _, o: o[k], updates, out)  # noqa: E731
        return pick(0), ScaleByAdam8bitState(count, pick(1), pick(2), pick(3), pick(4))

    return optax.GradientTransformation(init_fn, update_fn)


def adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    min_8bit_size: int = 4096,
) -> optax.GradientTransformation:
    """AdamW with 8-bit moments: ``chain(scale_by_adam_8bit, add_decayed_weights, -lr)``."""
    return optax.chain(
        scale_by_adam_8bit(b1, b2, eps, min_8bit_size),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
