"""LoRADense against float64 references of y = x W^T + b + s·x A^T B^T, and PEFT's semantics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax import quant
from qlora_jax.nn import LoRAConfig, LoRADense, QuantConfig, check_trainable, merge_params, merged_weight, split_params

IN, OUT, R = 128, 64, 8


def _layer(lora=LoRAConfig(rank=R, alpha=16, dropout=0.0), quant_cfg=QuantConfig(), dtype=jnp.float32, bias=False):
    return LoRADense(OUT, lora=lora, quant=quant_cfg, dtype=dtype, use_bias=bias, impl="xla")


def _init(layer, rng, x, random_b=True):
    v = layer.init(jax.random.key(int(rng.integers(1 << 30))), x)
    if random_b and "params" in v:
        v["params"]["lora_b"] = jnp.asarray(rng.standard_normal(v["params"]["lora_b"].shape) * 0.1, jnp.float32)
    if layer.use_bias:
        v["base"]["bias"] = jnp.asarray(rng.standard_normal(OUT), layer.dtype)
    return v


def _w64(kernel):
    if isinstance(kernel, quant.QuantizedTensor):
        return np.asarray(quant.dequantize(kernel, jnp.float32), np.float64)
    return np.asarray(kernel, np.float64)


def _reference(v, x, scale):
    """float64 y = x W^T + b + s · x A^T B^T."""
    x = np.asarray(x, np.float64)
    y = x @ _w64(v["base"]["kernel"]).T
    if "bias" in v["base"]:
        y = y + np.asarray(v["base"]["bias"], np.float64)
    if "params" in v:
        a, b = (np.asarray(v["params"][k], np.float64) for k in ("lora_a", "lora_b"))
        y = y + scale * (x @ a.T) @ b.T
    return y


@pytest.mark.parametrize("quant_cfg", [QuantConfig(), QuantConfig("fp4", 128, False), None])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_matches_float64(fresh_rng, quant_cfg, bias):
    layer = _layer(quant_cfg=quant_cfg, bias=bias)
    x = jnp.asarray(fresh_rng.standard_normal((3, 5, IN)), jnp.float32)
    v = _init(layer, fresh_rng, x)
    y = np.asarray(layer.apply(v, x), np.float64)
    want = _reference(v, x, 16 / R)
    assert np.abs(y - want).max() <= 1e-5 * np.abs(want).max()


def test_bf16_compute_within_bf16_tolerance(fresh_rng):
    layer = _layer(dtype=jnp.bfloat16)
    x = jnp.asarray(fresh_rng.standard_normal((4, IN)), jnp.float32)
    v = _init(layer, fresh_rng, x)
    y = layer.apply(v, x)
    assert y.dtype == jnp.bfloat16
    want = _reference(v, np.asarray(x.astype(jnp.bfloat16), np.float64), 16 / R)
    assert np.linalg.norm(np.asarray(y, np.float64) - want) <= 1e-2 * np.linalg.norm(want)


def test_zero_b_is_exactly_the_base(fresh_rng):
    x = jnp.asarray(fresh_rng.standard_normal((4, IN)), jnp.float32)
    layer = _layer()
    v = _init(layer, fresh_rng, x, random_b=False)
    np.testing.assert_array_equal(np.asarray(v["params"]["lora_b"]), 0.0)
    base = LoRADense(OUT, lora=None, quant=QuantConfig(), dtype=jnp.float32, impl="xla")
    np.testing.assert_array_equal(layer.apply(v, x), base.apply({"base": v["base"]}, x))


@pytest.mark.parametrize("rslora,expected", [(False, 32 / 16), (True, 32 / math.sqrt(16))])
def test_scale_alpha_over_r_and_rslora(fresh_rng, rslora, expected):
    cfg = LoRAConfig(rank=16, alpha=32, dropout=0.0, use_rslora=rslora)
    assert cfg.scale == pytest.approx(expected)
    layer = _layer(lora=cfg)
    x = jnp.asarray(fresh_rng.standard_normal((4, IN)), jnp.float32)
    v = _init(layer, fresh_rng, x)
    base = layer.apply(
        {"base": v["base"], "params": {**v["params"], "lora_b": jnp.zeros_like(v["params"]["lora_b"])}}, x
    )
    delta = np.asarray(layer.apply(v, x) - base, np.float64)
    a, b = (np.asarray(v["params"][k], np.float64) for k in ("lora_a", "lora_b"))
    want = expected * (np.asarray(x, np.float64) @ a.T) @ b.T
    assert np.abs(delta - want).max() <= 1e-5 * np.abs(want).max()


def test_dropout_only_on_the_adapter_and_only_in_training(fresh_rng):
    layer = _layer(lora=LoRAConfig(rank=R, alpha=16, dropout=0.5))
    x = jnp.asarray(fresh_rng.standard_normal((2, IN)), jnp.float32)
    v = _init(layer, fresh_rng, x, random_b=False)
    # B = 0: the adapter contributes nothing, so training mode must equal eval mode exactly
    train = layer.apply(v, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(train, layer.apply(v, x))
    v = _init(layer, fresh_rng, x)
    evald = np.asarray(layer.apply(v, x), np.float64)
    np.testing.assert_array_equal(layer.apply(v, x, deterministic=True), layer.apply(v, x))
    # 4000 masks: the Monte Carlo error of their mean is ~0.02 of the adapter's contribution (with
    # 300 it was ~0.06, and a fresh seed once drew 0.115 against the 0.1 bound)
    keys = jax.random.split(jax.random.key(0), 4000)
    outs = jax.vmap(lambda k: layer.apply(v, x, deterministic=False, rngs={"dropout": k}))(keys)
    outs = np.asarray(outs, np.float64)
    assert not np.allclose(outs[0], evald)  # dropout is active in training
    base = np.asarray(_layer(lora=None).apply({"base": v["base"]}, x), np.float64)
    # inverted dropout: the mean adapter contribution over masks approaches the eval one (without
    # the 1 / (1 - p) scale it would be half of it: 0.5 away)
    assert np.linalg.norm(outs.mean(0) - evald) <= 0.1 * np.linalg.norm(evald - base)


def test_init_matches_peft(fresh_rng):
    x = jnp.zeros((1, IN))
    v = _layer(lora=LoRAConfig(rank=64, alpha=16)).init(jax.random.key(0), x)
    a = np.asarray(v["params"]["lora_a"])
    bound = 1 / math.sqrt(IN)
    assert a.shape == (64, IN) and np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
    assert abs(a.var() - bound**2 / 3) < 0.1 * bound**2 / 3  # U(-b, b) has variance b^2/3
    g = np.asarray(_layer(lora=LoRAConfig(rank=64, init="gaussian")).init(jax.random.key(0), x)["params"]["lora_a"])
    assert abs(g.std() - 1 / 8) < 0.01  # N(0, 1/r), r = 64
    assert v["params"]["lora_a"].dtype == jnp.float32
    bf = _layer(lora=LoRAConfig(rank=4, dtype=jnp.bfloat16)).init(jax.random.key(0), x)["params"]
    assert bf["lora_a"].dtype == jnp.bfloat16 and bf["lora_b"].dtype == jnp.bfloat16


def test_gradients_only_for_adapters_and_match_float64(fresh_rng):
    layer = _layer()
    x = jnp.asarray(fresh_rng.standard_normal((6, IN)), jnp.float32)
    v = _init(layer, fresh_rng, x)
    params, frozen = split_params(v)
    check_trainable(params)
    c = fresh_rng.standard_normal((6, OUT))
    grads = jax.grad(lambda p: jnp.sum(layer.apply(merge_params(p, frozen), x) * c))(params)
    assert set(grads) == {"lora_a", "lora_b"}
    s = 16 / R
    x64 = np.asarray(x, np.float64)
    a, b = (np.asarray(params[k], np.float64) for k in ("lora_a", "lora_b"))
    want_b = s * c.T @ (x64 @ a.T)  # [out, r]
    want_a = s * (c @ b).T @ x64  # [r, in]
    np.testing.assert_allclose(np.asarray(grads["lora_b"]), want_b, rtol=1e-5, atol=1e-5 * np.abs(want_b).max())
    np.testing.assert_allclose(np.asarray(grads["lora_a"]), want_a, rtol=1e-5, atol=1e-5 * np.abs(want_a).max())


def test_check_trainable_rejects_non_adapter_leaves():
    with pytest.raises(ValueError, match="non-adapter leaves"):
        check_trainable({"q_proj": {"lora_a": jnp.zeros(1), "kernel": jnp.zeros(1)}})


def test_rank_zero_is_a_plain_quantized_linear(fresh_rng):
    x = jnp.asarray(fresh_rng.standard_normal((2, IN)), jnp.float32)
    v = _layer(lora=LoRAConfig(rank=0)).init(jax.random.key(0), x)
    assert "params" not in v
    assert isinstance(v["base"]["kernel"], quant.QuantizedTensor)


def test_merge_equals_unmerged_forward(fresh_rng):
    layer = _layer(dtype=jnp.float32)
    x = jnp.asarray(fresh_rng.standard_normal((4, IN)), jnp.float32)
    v = _init(layer, fresh_rng, x)
    merged = merged_weight(v["base"]["kernel"], v["params"]["lora_a"], v["params"]["lora_b"], 16 / R)
    assert merged.dtype == jnp.bfloat16 and merged.shape == (OUT, IN)
    y_merged = np.asarray(x, np.float64) @ np.asarray(merged, np.float64).T
    y = np.asarray(layer.apply(v, x), np.float64)
    assert np.linalg.norm(y_merged - y) <= 1e-2 * np.linalg.norm(y)  # the merge is rounded to bf16
    qt, stats = merged_weight(
        v["base"]["kernel"], v["params"]["lora_a"], v["params"]["lora_b"], 16 / R, requantize=QuantConfig()
    )
    assert isinstance(qt, quant.QuantizedTensor) and qt.shape == (OUT, IN)
    # NF4 of a near-Gaussian weight: ~10% relative error (bnb's 0.2 mean relative error per element)
    assert 0.01 < stats["rel_fro_err"] < 0.2 and stats["max_abs_err"] > 0


def test_lora_config_validation():
    with pytest.raises(ValueError, match="rank must be >= 0"):
        LoRAConfig(rank=-1)
    with pytest.raises(ValueError, match="dropout must be in"):
        LoRAConfig(dropout=1.0)
    with pytest.raises(ValueError, match="init must be"):
        LoRAConfig(init="xavier")
