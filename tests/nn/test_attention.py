"""Chunked attention against the whole-matrix reference: values, gradients, and memory that grows
with the sequence instead of its square."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.nn import LlamaConfig, LlamaForCausalLM, LoRAConfig, QuantConfig
from qlora_jax.nn.attention import allowed_keys, chunked_attention, dot_product_attention, reference_attention

B, S, N, G, D = 2, 37, 2, 3, 8  # 37 keys: not a multiple of the chunk of 8
CASES = {  # (soft-cap, window, sliding, packed)
    "causal+padding": (None, None, False, False),
    "packed+window+cap": (0.7, 6, True, True),
    "window-on-a-global-layer": (None, 6, False, True),
    "traced-sliding-flag+cap": (2.0, 5, jnp.asarray(True), False),
}


def _inputs():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((B, S, N, G, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, S, N, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, S, N, D)), jnp.float32)
    key_mask = jnp.asarray(np.arange(S)[None] >= np.array([[0], [5]]))  # row 1: 5 padding tokens first
    seg = jnp.asarray(np.where(np.arange(S)[None] < np.array([[20], [S]]), 1, 2) * key_mask)
    pos = jnp.asarray(np.where(np.arange(S) < 20, np.arange(S), np.arange(S) - 20)[None].repeat(B, 0))
    return q, k, v, key_mask, seg, pos, rng


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_attention_equals_the_reference_with_its_gradients(case):
    cap, window, sliding, packed = CASES[case]
    q, k, v, key_mask, seg, pos, rng = _inputs()
    qs = ks = seg if packed else None
    allowed = allowed_keys(pos, pos, key_mask, qs, ks, sliding, window)

    def ref(q, k, v):
        return reference_attention(q, k, v, allowed, scale=0.3, cap=cap)

    def chunked(q, k, v):
        return chunked_attention(q, k, v, pos, pos, key_mask, qs, ks, sliding, window=window, scale=0.3, cap=cap,
                                 chunk=8)  # fmt: skip

    real = jnp.asarray(allowed.any(-1))[:, :, None, None, None]  # query rows with a key to attend to
    a, b = ref(q, k, v), chunked(q, k, v)
    assert float(jnp.abs(jnp.where(real, a - b, 0)).max()) <= 1e-5 * float(jnp.abs(a).max())
    w = jnp.asarray(rng.standard_normal(a.shape), jnp.float32) * real  # a loss on the real rows
    grads_ref = jax.grad(lambda *x: jnp.sum(ref(*x) * w), argnums=(0, 1, 2))(q, k, v)
    grads = jax.grad(lambda *x: jnp.sum(chunked(*x) * w), argnums=(0, 1, 2))(q, k, v)
    for name, x, y in zip("qkv", grads_ref, grads, strict=True):
        assert float(jnp.abs(x - y).max()) <= 1e-5 * float(jnp.abs(x).max()), name


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][0] is None])  # it has no soft-cap
def test_jax_dot_product_attention_equals_the_reference_with_its_gradients(case):
    """jax.nn.dot_product_attention (XLA here, cuDNN on a GPU) on the same masks and grouped heads."""
    _, window, sliding, packed = CASES[case]
    q, k, v, key_mask, seg, pos, rng = _inputs()
    qs = seg if packed else None
    # and five query rows with no key at all (the reference attends to every key there)
    allowed = allowed_keys(pos, pos, key_mask, qs, qs, sliding, window).at[1, :5].set(False)

    def ref(q, k, v):
        return reference_attention(q, k, v, allowed, scale=0.3)

    def fused(q, k, v):
        return dot_product_attention(q, k, v, allowed, scale=0.3, implementation="xla")

    a, b = ref(q, k, v), fused(q, k, v)
    assert float(jnp.abs(a - b).max()) <= 1e-5 * float(jnp.abs(a).max())
    w = jnp.asarray(rng.standard_normal(a.shape), jnp.float32)
    grads_ref = jax.grad(lambda *x: jnp.sum(ref(*x) * w), argnums=(0, 1, 2))(q, k, v)
    grads = jax.grad(lambda *x: jnp.sum(fused(*x) * w), argnums=(0, 1, 2))(q, k, v)
    for name, x, y in zip("qkv", grads_ref, grads, strict=True):
        assert float(jnp.abs(x - y).max()) <= 1e-5 * float(jnp.abs(x).max()), name


def test_a_model_with_dot_product_attention_gives_the_chunked_ones_logits_and_refuses_soft_caps():
    from hf_fixtures import HF, reference

    from qlora_jax.checkpoints import load_pretrained

    for name in ("gemma3_text", "mistral"):  # sliding + global layers, GQA; every layer sliding
        ref = reference(name)
        model, v = load_pretrained(HF / name, quant=None, dtype=jnp.float32, progress=False)
        args = (ref["input_ids"], ref["attention_mask"], ref["position_ids"])
        real = ref["attention_mask"].astype(bool)
        logits = np.asarray(model.clone(attention="dot_product").apply(v, *args))
        assert np.abs(logits - ref["logits"])[real].max() <= 1e-4, name
    model, v = load_pretrained(HF / "gemma2", quant=None, dtype=jnp.float32, progress=False)
    with pytest.raises(ValueError, match=r"cannot soft-cap scores; this gemma2 model has attn_logit_softcapping=0\.5"):
        model.clone(attention="dot_product").apply(v, ref["input_ids"])


def _step_temp_bytes(attention: str, seq_len: int) -> int:
    """XLA's temporaries for the gradient of a 1-block QLoRA model (layers scanned, as trained)."""
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)  # fmt: skip
    model = LlamaForCausalLM(cfg, lora=LoRAConfig(rank=4), quant=QuantConfig(), attention=attention)
    v = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))

    def loss(params, base, ids):
        return model.apply({"params": params, "base": base}, ids).mean()

    ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return jax.jit(jax.grad(loss)).lower(v["params"], v["base"], ids).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_activation_memory_grows_linearly_with_chunked_attention_and_quadratically_without():
    chunked = [_step_temp_bytes("chunked", s) for s in (1024, 2048, 4096)]
    reference = [_step_temp_bytes("reference", s) for s in (1024, 2048, 4096)]
    # measured on CPU: 40.1, 80.1, 160.1 MB against 68.7, 271.5, 1080.0 MB
    assert all(1.8 <= b / a <= 2.2 for a, b in itertools.pairwise(chunked)), chunked
    assert all(3.5 <= b / a <= 4.2 for a, b in itertools.pairwise(reference)), reference
