"""The jitted training and evaluation steps.

``train_step(state, base, batch, rng)`` differentiates the loss with respect to ``state.params``
(the LoRA tree) only; the base is an argument that is never donated nor updated. The
batch carries a leading micro-batch axis for gradient accumulation: ``[accum, B, T]``; gradients
are summed over micro-batches weighted by their target tokens, so accumulation equals one large
batch. The step returns its measurements (big_vision style): loss, grad norm, update norm,
learning rate, target tokens.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from qlora_jax.nn import moe
from qlora_jax.nn.llama import ROUTER_STATS
from qlora_jax.nn.lora import merge_params

Array = jax.Array


class TrainState(NamedTuple):
    step: Array  # int32 scalar
    params: Any  # what trains: the LoRA adapters, or every base weight with train.trainable='full'
    opt_state: Any


def target_mask(batch, xp=jnp):
    """``[B, T-1]``: which next tokens are loss targets (``xp``: jnp in the step, numpy on the host)."""
    mask = xp.logical_and(batch["loss_mask"][:, 1:], batch["attention_mask"][:, 1:])
    segments = batch.get("segment_ids")
    if segments is not None:  # never predict an example's first token from the one before it in the row
        mask = xp.logical_and(mask, segments[:, 1:] == segments[:, :-1])
    return mask


def token_loss(
    model, params, base, batch, rng, deterministic: bool, collection: str = "params", router_aux_loss_coef: float = 0.0
) -> tuple[Array, Array]:
    """(sum of next-token cross-entropy over loss-masked targets, number of those targets).

    ``params`` is the trainable variable collection named ``collection``: ``"params"`` (the LoRA
    adapters, with ``base`` the frozen base tree) or, for full-parameter training of an unquantized
    model, ``"base"`` (``params`` is then the base itself and ``base`` is unused).

    ``router_aux_loss_coef`` > 0 (a MoE model): the sum also holds ``coef · aux · targets``, with
    ``aux`` the router's load-balancing loss over this batch's tokens (:func:`router_aux_loss`),
    so that the mean over targets is ``cross-entropy + coef · aux`` as transformers adds it.
    """
    total, n, aux = _losses(model, params, base, batch, rng, deterministic, collection, router_aux_loss_coef > 0)
    return total + router_aux_loss_coef * aux * n, n


def _losses(model, params, base, batch, rng, deterministic, collection, with_aux):
    """(cross-entropy sum, targets, load-balancing loss or 0)."""
    segments = batch.get("segment_ids")  # packed rows (data.packing); absent otherwise
    out = model.apply(
        merge_params(params, base, collection),
        batch["input_ids"],
        batch["attention_mask"],
        batch.get("positions"),
        deterministic=deterministic,
        segment_ids=segments,
        rngs=None if deterministic else {"dropout": rng},
        mutable=["intermediates"] if with_aux else False,
    )  # [B, T, V] float32
    logits, aux = out, jnp.float32(0)
    if with_aux:
        logits, state = out
        if ROUTER_STATS not in state.get("intermediates", {}):
            raise ValueError("router_aux_loss_coef > 0 needs a mixture-of-experts model; this one has no router")
        aux = moe.load_balancing_loss(state["intermediates"][ROUTER_STATS][0])
    targets = batch["input_ids"][:, 1:]
    mask = target_mask(batch)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask), aux


def make_train_step(
    model, tx: optax.GradientTransformation, schedule=None, collection: str = "params", router_aux_loss_coef=0.0
):
    """A ``train_step(state, base, batch, rng) -> (state, metrics)`` to jit with
    ``donate_argnums=0`` (the state, never the frozen base). ``collection``, ``router_aux_loss_coef``:
    see :func:`token_loss` (with a coefficient, ``loss`` is the cross-entropy alone and
    ``router_aux_loss`` the load-balancing loss, both means over target tokens)."""
    with_aux = router_aux_loss_coef > 0

    def train_step(state: TrainState, base, batch, rng):
        def micro(carry, mb):
            grads_sum, loss_sum, aux_sum, count = carry
            key = jax.random.fold_in(rng, count.astype(jnp.int32))

            def objective(p):
                total, n, aux = _losses(model, p, base, mb, key, False, collection, with_aux)
                return total + router_aux_loss_coef * aux * n, (total, aux * n, n)

            (_, (loss, aux, n)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
            return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss, aux_sum + aux, count + n), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, loss_sum, aux_sum, tokens), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0, jnp.int32(0)), batch)
        denom = jnp.maximum(tokens, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denom, grads)  # mean over all target tokens
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss_sum / denom,
            "grad_norm": optax.tree.norm(grads),
            "update_norm": optax.tree.norm(updates),
            "learning_rate": schedule(state.step) if schedule is not None else jnp.float32(0),
            "tokens": tokens,
        }
        if with_aux:
            metrics["router_aux_loss"] = aux_sum / denom
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def make_eval_step(model, collection: str = "params"):
    """``eval_step(params, base, batch) -> (loss sum, target tokens)`` for one batch ``[B, T]``."""

    def eval_step(params, base, batch):
        return token_loss(model, params, base, batch, None, deterministic=True, collection=collection)

    return eval_step
