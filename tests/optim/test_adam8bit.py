"""8-bit AdamW: its quantizer is exact nearest-code on bnb's dynamic maps; it tracks fp32 AdamW."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qlora_jax.optim import adamw_8bit, state_bytes_by_memory_kind
from qlora_jax.optim.adam8bit import DYNAMIC_UNSIGNED, dequantize_moment, quantize_moment
from qlora_jax.quant import codebooks


@pytest.mark.parametrize("signed", [True, False])
def test_moment_codes_are_exact_nearest(fresh_rng, signed):
    x = fresh_rng.standard_normal(3000) * fresh_rng.choice([1e-4, 1.0], 3000)
    x = (x if signed else x**2).astype(np.float32)
    codes, absmax = quantize_moment(jnp.asarray(x), signed)
    table = (codebooks.DYNAMIC_SIGNED if signed else DYNAMIC_UNSIGNED).astype(np.float64)
    a = np.abs(np.pad(x, (0, 72))).reshape(-1, 256).max(1)
    np.testing.assert_array_equal(np.asarray(absmax), a)
    scaled = x * np.repeat(np.float32(1) / a, 256)[: x.size]
    want = np.argmin(np.abs(scaled.astype(np.float64)[:, None] - table[None, :]), axis=1)
    np.testing.assert_array_equal(table[np.asarray(codes)], table[want])  # by value: unsigned has duplicate zeros
    back = np.asarray(dequantize_moment(codes, absmax, signed))
    np.testing.assert_array_equal(back, (table[np.asarray(codes)] * np.repeat(a, 256)[: x.size]).astype(np.float32))


def test_unsigned_map_is_bnb_s(bnb):
    np.testing.assert_array_equal(DYNAMIC_UNSIGNED, bnb["tables/dynamic_unsigned"])


def test_tracks_fp32_adamw_on_an_mlp(fresh_rng):
    x = jnp.asarray(fresh_rng.standard_normal((512, 32)), jnp.float32)
    y = jnp.tanh(x @ jnp.asarray(fresh_rng.standard_normal((32, 1)), jnp.float32))
    params = {
        "w1": jnp.asarray(fresh_rng.standard_normal((32, 256)) * 0.1, jnp.float32),
        "b1": jnp.zeros(256),
        "w2": jnp.asarray(fresh_rng.standard_normal((256, 64)) * 0.1, jnp.float32),
        "w3": jnp.asarray(fresh_rng.standard_normal((64, 1)) * 0.1, jnp.float32),
    }

    def loss(p):
        h = jnp.tanh(jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"])
        return jnp.mean((h @ p["w3"] - y) ** 2)

    curves, states = {}, {}
    for name, tx in (("fp32", optax.adamw(3e-3)), ("8bit", adamw_8bit(3e-3))):
        p, s = params, tx.init(params)

        @jax.jit
        def step(p, s, tx=tx):
            val, g = jax.value_and_grad(loss)(p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s, val

        curve = []
        for _ in range(150):
            p, s, val = step(p, s)
            curve.append(float(val))
        curves[name], states[name] = np.array(curve), s
    start = curves["fp32"][0]
    assert curves["8bit"][-1] < 0.01 * start  # it trains
    # loss curves close: within 10 % of the starting loss at every step, and both converge
    assert np.abs(curves["8bit"] - curves["fp32"]).max() < 0.1 * start
    ratio = state_bytes_by_memory_kind(states["8bit"])["device"] / state_bytes_by_memory_kind(states["fp32"])["device"]
    assert 0.24 < ratio < 0.3  # uint8 codes + fp32 absmax per 256, vs fp32: 2/8 + 2/256 (+ small fp32 b1)


def test_small_tensors_stay_fp32():
    state = adamw_8bit(1e-3).init({"a": jnp.zeros(4095), "b": jnp.zeros(4096)})[0]
    assert state.mu["a"].dtype == jnp.float32 and state.mu_absmax["a"].shape == (0,)
    assert state.mu["b"].dtype == jnp.uint8 and state.mu_absmax["b"].shape == (16,)
