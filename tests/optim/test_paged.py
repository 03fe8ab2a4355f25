"""paged(): bit-identical to the wrapped optimizer, moments in pinned_host between steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from qlora_jax.optim import adamw_8bit, memory_report, paged, state_bytes_by_memory_kind


def _params(rng):
    p = {f"w{i}": jnp.asarray(rng.standard_normal((200 + i, 300)), jnp.float32) for i in range(4)}
    p["small"] = jnp.asarray(rng.standard_normal(7), jnp.float32)
    return p


def _step(tx):
    def f(p, s, k):
        g = jax.tree.map(lambda x: jnp.sin(x * k) + 0.1 * x, p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return jax.jit(f, donate_argnums=(0, 1))


def _kinds(tree):
    return jax.tree.map(lambda a: a.sharding.memory_kind, tree)


@pytest.mark.parametrize("clip", [False, True])
def test_bit_identical_to_plain_adamw_over_20_donated_steps(fresh_rng, clip):
    base = optax.adamw(1e-2, weight_decay=0.01)
    if clip:
        base = optax.chain(optax.clip_by_global_norm(0.3), base)
    tx = paged(base, min_size=1000)
    params = _params(fresh_rng)
    p1, s1 = jax.tree.map(jnp.copy, params), base.init(params)
    p2, s2 = jax.tree.map(jnp.copy, params), tx.init(params)
    f1, f2 = _step(base), _step(tx)
    for k in range(20):
        p1, s1 = f1(p1, s1, jnp.float32(k + 1))
        p2, s2 = f2(p2, s2, jnp.float32(k + 1))
        adam = s2.inner[-1][0] if clip else s2.inner[0]
        assert all(kind == "pinned_host" for name, kind in _kinds(adam.mu).items() if name != "small")
        assert _kinds(adam.mu)["small"] == "device" and adam.count.sharding.memory_kind == "device"
    jax.tree.map(np.testing.assert_array_equal, p1, p2)


def test_chunked_update_equals_unchunked_to_a_few_ulps(fresh_rng):
    """Several chunks compile to different fusions, where XLA contracts multiply-adds into FMAs
    differently: each step's update may differ from the one-chunk update by rounding only."""
    base = optax.chain(optax.clip_by_global_norm(0.3), optax.adamw(1e-2))
    params = _params(fresh_rng)
    one, chunked = paged(base, min_size=1000), paged(base, min_size=1000, chunk_bytes=500_000)
    grads = jax.tree.map(lambda x: jnp.sin(3 * x), params)
    s1, s2 = one.init(params), chunked.init(params)
    for _ in range(3):
        u1, s1 = jax.jit(one.update)(grads, s1, params)
        u2, s2 = jax.jit(chunked.update)(grads, s2, params)
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
            a, b = np.asarray(a), np.asarray(b)
            assert np.all(np.abs(a - b) <= 4 * np.spacing(np.abs(a)) + 1e-12)
        s2 = jax.tree.map(lambda x, y: x, s1, s2)  # continue both from the same state


def test_chunks_keep_paged_state_on_host(fresh_rng):
    tx = paged(optax.adam(1e-3), min_size=1000, chunk_bytes=300_000)
    params = _params(fresh_rng)
    state = tx.init(params)
    compiled = jax.jit(tx.update).lower(jax.tree.map(jnp.ones_like, params), state, params).compile()
    ins, outs = compiled.input_shardings[0][1], compiled.output_shardings[1]
    mu_in, mu_out = ins.inner[0].mu, outs.inner[0].mu
    for name in params:
        want = "device" if name == "small" else "pinned_host"
        assert mu_in[name].memory_kind == want and mu_out[name].memory_kind == want


def test_memory_report(fresh_rng):
    params = _params(fresh_rng)
    report = memory_report(optax.adam(1e-3), params, min_size=1000)
    large = sum(v.nbytes for k, v in params.items() if k != "small")
    assert report["plain"]["state_bytes"] == {"device": 2 * (large + 28) + 4}
    assert report["paged"]["state_bytes"] == {"pinned_host": 2 * large, "device": 2 * 28 + 4}
    assert report["paged"]["state_input_memory_kinds"] == ["device", "pinned_host"]
    assert report["plain"]["state_input_memory_kinds"] == ["device"]
    assert report["plain"]["update"]["argument"] > 0


def test_orbax_round_trip_then_identical_training(tmp_path, fresh_rng):
    tx = paged(optax.chain(optax.clip_by_global_norm(0.3), optax.adamw(1e-2)), min_size=1000)
    params = _params(fresh_rng)
    p, s = jax.tree.map(jnp.copy, params), tx.init(params)
    step = _step(tx)
    for k in range(3):
        p, s = step(p, s, jnp.float32(k + 1))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "state", {"params": p, "opt": s})
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": p, "opt": s})
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(tmp_path / "state", target)
    assert state_bytes_by_memory_kind(restored["opt"]) == state_bytes_by_memory_kind(s)
    p2, s2 = restored["params"], restored["opt"]
    for k in range(3, 8):
        p, s = step(p, s, jnp.float32(k + 1))
        p2, s2 = step(p2, s2, jnp.float32(k + 1))
    jax.tree.map(np.testing.assert_array_equal, p, p2)


def test_pages_8bit_adam_codes(fresh_rng):
    params = _params(fresh_rng)
    tx = paged(adamw_8bit(1e-3), min_size=1000)
    state = tx.init(params)
    inner = state.inner[0]
    assert inner.mu["w0"].dtype == jnp.uint8 and inner.mu["w0"].sharding.memory_kind == "pinned_host"
    assert inner.mu_absmax["w0"].sharding.memory_kind == "device"  # 1/256 of the codes: stays
    p1, s1 = jax.tree.map(jnp.copy, params), adamw_8bit(1e-3).init(params)
    p2, s2 = jax.tree.map(jnp.copy, params), state
    f1, f2 = _step(adamw_8bit(1e-3)), _step(tx)
    for k in range(5):
        p1, s1 = f1(p1, s1, jnp.float32(k + 1))
        p2, s2 = f2(p2, s2, jnp.float32(k + 1))
    jax.tree.map(np.testing.assert_array_equal, p1, p2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="min_size must be >= 1"):
        paged(optax.adam(1e-3), min_size=0)
    with pytest.raises(ValueError, match="chunk_bytes must be positive"):
        paged(optax.adam(1e-3), chunk_bytes=0)
