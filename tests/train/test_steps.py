"""Train step: differentiates the adapters only, accumulation equals one large batch, the loss
masks targets, metrics are the true quantities."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qlora_jax.data import ByteTokenizer, Tokenized, collate
from qlora_jax.nn import LlamaConfig, LlamaForCausalLM, LoRAConfig, QuantConfig, split_params
from qlora_jax.train import TrainState, make_train_step, token_loss

TOK = ByteTokenizer()
CFG = LlamaConfig(vocab_size=TOK.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1)


def _setup(seed=0):
    model = LlamaForCausalLM(CFG, lora=LoRAConfig(rank=4, dropout=0.0), quant=QuantConfig(), dtype=jnp.float32)
    v = model.init(jax.random.key(seed), jnp.ones((1, 4), jnp.int32))
    params, frozen = split_params(v)
    params = jax.tree.map(lambda a: a + 0.02, params)  # nonzero B
    return model, params, frozen


def _batch(rng, b=4, t=16):
    items = []
    for _ in range(b):
        n = int(rng.integers(6, t))
        ids = rng.integers(0, 256, n).astype(np.int32)
        mask = np.arange(n) >= n // 2
        items.append(Tokenized(ids, mask))
    return collate(items, TOK.pad_id, 16)


def test_loss_counts_only_masked_targets(fresh_rng):
    model, params, frozen = _setup()
    batch = _batch(fresh_rng)
    total, n = token_loss(model, params, frozen, batch, None, deterministic=True)
    logits = np.asarray(
        model.apply({"params": params, "base": frozen}, batch["input_ids"], batch["attention_mask"]), np.float64
    )
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    want, count = 0.0, 0
    for r in range(4):
        for t in range(15):
            if batch["loss_mask"][r, t + 1] and batch["attention_mask"][r, t + 1]:
                want -= logp[r, t, batch["input_ids"][r, t + 1]]
                count += 1
    assert int(n) == count
    np.testing.assert_allclose(float(total), want, rtol=1e-5)


def test_accumulation_equals_one_large_batch_and_only_adapters_change(fresh_rng):
    model, params, frozen = _setup()
    tx = optax.sgd(0.1)
    step = jax.jit(make_train_step(model, tx, optax.constant_schedule(0.1)))
    big = _batch(fresh_rng, b=8)
    one = {k: v[None] for k, v in big.items()}  # [1, 8, T]
    two = {k: v.reshape(2, 4, -1) for k, v in big.items()}  # [2, 4, T]
    s1, m1 = step(TrainState(jnp.int32(0), params, tx.init(params)), frozen, one, jax.random.key(0))
    s2, m2 = step(TrainState(jnp.int32(0), params, tx.init(params)), frozen, two, jax.random.key(0))
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), s1.params, s2.params)
    assert int(s1.step) == 1 and float(m1["learning_rate"]) == np.float32(0.1)
    grads = jax.grad(
        lambda p: token_loss(model, p, frozen, big, None, True)[0] / token_loss(model, p, frozen, big, None, True)[1]
    )(params)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(optax.tree.norm(grads)), rtol=1e-4)
    np.testing.assert_allclose(float(m1["update_norm"]), 0.1 * float(m1["grad_norm"]), rtol=1e-4)
    assert set(jax.tree.leaves(jax.tree.map(lambda p: p.shape, s1.params))) == set(
        jax.tree.leaves(jax.tree.map(lambda p: p.shape, params))
    )


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear"])
def test_learning_rate_schedule_warms_up_then_follows_its_shape(kind):
    from experiments.configs import tiny
    from qlora_jax.train.train_lib import build_optimizer

    c = tiny.get_config()
    c.train.steps, c.train.warmup_ratio, c.train.learning_rate, c.train.lr_schedule = 110, 10 / 110, 1e-3, kind
    schedule = build_optimizer(c).schedule
    lr = {s: float(schedule(s)) for s in (5, 10, 60, 110)}
    # 10 warmup steps, then 100 steps of decay: halfway (step 60) cosine and linear are both at lr / 2
    want = {"constant": (5e-4, 1e-3, 1e-3, 1e-3), "cosine": (5e-4, 1e-3, 5e-4, 0.0), "linear": (5e-4, 1e-3, 5e-4, 0.0)}
    np.testing.assert_allclose(list(lr.values()), want[kind], rtol=1e-6, atol=1e-12)


def test_packed_rows_give_the_loss_and_gradients_of_the_same_examples_unpacked(fresh_rng):
    """Several examples in one row (segment ids, restarting positions) are the same computation as
    each alone: the mean loss over the same targets agrees to float32 rounding (measured 1.7e-7
    relative over 3 seeds, checked at 1e-5), and so do the adapter gradients (3.5e-7 of each
    leaf's largest entry, checked at 1e-5). The first token of an example is a target under
    train_on='all': it must not be predicted from the example before it in the row."""
    from qlora_jax.data import collate_packed

    model, params, frozen = _setup()
    items = []
    for _ in range(6):
        n = int(fresh_rng.integers(5, 14))
        ids = fresh_rng.integers(0, 256, n).astype(np.int32)
        items.append(Tokenized(ids, np.ones(n, bool)))  # every token a target, the first one too

    def mean_loss(p, batch):
        total, n = token_loss(model, p, frozen, batch, None, deterministic=True)
        return total / n

    unpacked = {k: jnp.asarray(v) for k, v in collate(items, TOK.pad_id, 16).items()}
    packed = {k: jnp.asarray(v) for k, v in collate_packed([items[:3], items[3:]], TOK.pad_id, 48).items()}
    assert packed["input_ids"].shape == (2, 48) and int(packed["segment_ids"].max()) == 3
    step = jax.jit(jax.value_and_grad(mean_loss))
    want, grads_want = step(params, unpacked)
    got, grads_got = step(params, packed)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_got), jax.tree.leaves(grads_want), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    # without segment ids the same rows are one long sequence: another loss (the test can fail)
    leaky = {k: v for k, v in packed.items() if k not in ("segment_ids", "positions")}
    assert abs(float(jax.jit(mean_loss)(params, leaky)) - float(want)) > 1e-4


@pytest.mark.parametrize("optimizer", ["paged_adamw", "adamw", "paged_adamw_8bit"])
def test_bf16_adapters_keep_the_train_states_types_and_one_compilation(optimizer):
    """The step's output state has the input's dtypes (the 32-bit moments of bitsandbytes'
    AdamW), so the jitted step compiles once: with bf16 adapters optax's first moment started
    in bf16 and came back float32, and step 2 compiled again."""
    from experiments.configs import tiny
    from qlora_jax import parallel
    from qlora_jax.train import train_lib

    c = tiny.get_config("small")
    c.lora.dtype, c.train.optimizer, c.train.batch_size, c.train.paged_min_size = "bfloat16", optimizer, 4, 1000
    mesh = parallel.make_mesh(c.mesh.to_dict())
    built = train_lib.setup(c, mesh)
    model, frozen, state = built.model, built.base, built.state
    types = lambda tree: [(x.dtype, x.shape) for x in jax.tree.leaves(tree)]  # noqa: E731
    before = types(state.opt_state)
    if not optimizer.endswith("8bit"):  # both moments float32 (the 8-bit ones are codes + scales)
        assert {d for d, _ in before} == {jnp.dtype(jnp.int32), jnp.dtype(jnp.float32)}
    step = train_lib.jit_train_step(model, built.optimizer, built.state_shardings, seed=0)
    batch = {k: jnp.asarray(v)[None] for k, v in _batch(np.random.default_rng(0)).items()}
    with jax.set_mesh(mesh):
        for _ in range(3):
            state, metrics = step(state, frozen, batch)
    assert np.isfinite(float(metrics["loss"]))
    assert types(state.opt_state) == before
    assert step._cache_size() == 1
