"""Optimizer state kept in float32 whatever the parameters' dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def float32_moments(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` with its state made for float32 copies of the parameters.

    bf16 adapters then get 32-bit Adam moments, as bitsandbytes' (paged) AdamW keeps them. Plain
    optax starts the moments in the parameters' dtype, and the first update (float32 gradients:
    the train step's mean over target tokens) turns the first moment into float32: the jitted
    step compiled a second time at step 2 (130 s for SmolLM2-135M on CPU), the donated state
    could not be aliased, and an orbax restore cast saved moments back to bf16.
    """

    def init(params):
        def as_f32(p):
            return p.astype(jnp.float32) if jnp.issubdtype(p.dtype, jnp.floating) else p

        return tx.init(jax.tree.map(as_f32, params))

    return optax.GradientTransformation(init, tx.update)


def adamw(learning_rate, *, b2: float = 0.999, weight_decay: float = 0.0, eight_bit: bool = False):
    """The AdamW of ``config.train.optimizer``: 8-bit block-wise moments (:func:`adamw_8bit`), or
    optax's with float32 moments."""
    from qlora_jax.optim.adam8bit import adamw_8bit

    if eight_bit:
        return adamw_8bit(learning_rate, b2=b2, weight_decay=weight_decay)
    return float32_moments(optax.adamw(learning_rate, b2=b2, weight_decay=weight_decay))
