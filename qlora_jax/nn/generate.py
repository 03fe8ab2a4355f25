"""Autoregressive generation with the KV cache: greedy, or temperature + nucleus (top-p) sampling."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.nn.llama import LlamaForCausalLM, init_cache


def sample_token(logits: jax.Array, rng: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Next token ids ``[B]`` from logits ``[B, V]``: argmax at temperature 0, else top-p sampling."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)
    return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)


def prompt_bucket(length: int) -> int:
    """The padded prompt width :func:`generate` compiles for: the next power of two, at least 16."""
    return max(16, 1 << max(int(length) - 1, 0).bit_length())


def generate(
    model: LlamaForCausalLM,
    variables: dict,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    eos_token_id: int | tuple[int, ...] | None = None,
    bucket: bool = True,
) -> jax.Array:
    """Continue ``input_ids [B, S]`` (left-padded, ``attention_mask`` 1 for real tokens) by
    ``max_new_tokens`` tokens. Returns ``[B, S + max_new_tokens]``. ``eos_token_id``: the id, or
    ids (a chat model's end-of-turn and its EOS), that end a row; after one a row repeats it.

    With ``bucket`` the prompts are left-padded further, to :func:`prompt_bucket` ``(S)``, so that
    one compilation serves every prompt length of a bucket (a 30-layer model compiles for about
    15 s on a 2-core CPU); the padding is masked and changes no logit beyond float rounding."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1; got {temperature}, {top_p}")
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    extra = prompt_bucket(input_ids.shape[1]) - input_ids.shape[1] if bucket else 0
    if extra:
        input_ids = jnp.pad(jnp.asarray(input_ids), ((0, 0), (extra, 0)))
        attention_mask = jnp.pad(jnp.asarray(attention_mask), ((0, 0), (extra, 0)))
    rng = jax.random.key(0) if rng is None else rng
    variables = {k: v for k, v in variables.items() if k != "cache"}
    stops = None if eos_token_id is None else tuple(int(i) for i in np.atleast_1d(eos_token_id))
    out = _generate(
        model, variables, input_ids, attention_mask, rng, max_new_tokens, float(temperature), float(top_p), stops
    )
    return out[:, extra:]  # the bucket's padding off again


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8))
def _generate(model, variables, input_ids, attention_mask, rng, max_new, temperature, top_p, eos):
    b, s = input_ids.shape
    decoder = model.clone(decode=True)
    cache = init_cache(model.config, b, s + max_new, model.dtype, scan_layers=model.scan_layers)
    mask = attention_mask.astype(jnp.bool_)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
    logits, state = decoder.apply(
        {**variables, "cache": cache}, input_ids, mask, positions, mutable=["cache"]
    )  # prefill: [B, S, V]
    rng, key = jax.random.split(rng)
    token = sample_token(logits[:, -1], key, temperature, top_p)
    stops = None if eos is None else jnp.asarray(eos, jnp.int32)
    done = jnp.zeros((b,), jnp.bool_) if eos is None else jnp.isin(token, stops)
    out = jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(token)
    position = positions[:, -1] + 1

    def step(i, carry):
        out, cache, token, position, done, rng = carry
        logits, state = decoder.apply(
            {**variables, "cache": cache},
            token[:, None],
            jnp.ones((b, 1), jnp.bool_),
            position[:, None],
            mutable=["cache"],
        )
        rng, key = jax.random.split(rng)
        nxt = sample_token(logits[:, -1], key, temperature, top_p)
        if eos is not None:  # a finished row repeats the token that ended it
            nxt = jnp.where(done, token, nxt)
            done = done | jnp.isin(nxt, stops)
        return out.at[:, i].set(nxt), state["cache"], nxt, position + 1, done, rng

    carry = (out, state["cache"], token, position, done, rng)
    out = jax.lax.fori_loop(1, max_new, step, carry)[0]
    return jnp.concatenate([input_ids.astype(jnp.int32), out], axis=1)
