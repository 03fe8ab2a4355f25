"""The LLaMA-family model against transformers (fp32 logits), KV-cache generation, remat, targets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import HF, VARIANTS, reference

from qlora_jax import quant
from qlora_jax.checkpoints import load_pretrained
from qlora_jax.nn import LlamaConfig, LlamaForCausalLM, LoRAConfig, QuantConfig, generate, split_params
from qlora_jax.nn.llama import rope_inv_freq, stack_layers, unstack_layers


@pytest.mark.parametrize("name", VARIANTS)
def test_fp32_logits_match_transformers(name):
    ref = reference(name)
    model, v = load_pretrained(HF / name, quant=None, dtype=jnp.float32, progress=False)
    logits = model.apply(v, ref["input_ids"], ref["attention_mask"], ref["position_ids"])
    real = ref["attention_mask"].astype(bool)  # padded query rows are not compared
    assert np.abs(np.asarray(logits) - ref["logits"])[real].max() <= 1e-4


def test_default_positions_follow_left_padding():
    ref = reference("llama_gqa")
    model, v = load_pretrained(HF / "llama_gqa", quant=None, dtype=jnp.float32, progress=False)
    a = model.apply(v, ref["input_ids"], ref["attention_mask"])
    b = model.apply(v, ref["input_ids"], ref["attention_mask"], ref["position_ids"])
    np.testing.assert_array_equal(a, b)


def test_rope_llama3_scaling_changes_only_low_frequencies():
    base = LlamaConfig(rope_theta=500000.0)
    scaled = LlamaConfig(
        rope_theta=500000.0,
        rope_scaling={  # a dict, stored as sorted items
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        head_dim=128,
    )
    a = rope_inv_freq(LlamaConfig(rope_theta=500000.0, head_dim=128))
    b = rope_inv_freq(scaled)
    assert b[0] == a[0]  # the highest frequency is untouched
    np.testing.assert_allclose(b[-1], a[-1] / 8, rtol=1e-6)  # the lowest is divided by the factor
    assert base.dim_head == 16


@pytest.mark.parametrize("name", ["mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen2_moe"])
def test_kv_cache_generation_equals_recomputation(name):
    ref = reference(name)
    model, v = load_pretrained(HF / name, quant=None, dtype=jnp.float32, progress=False)
    ids, mask = jnp.asarray(ref["input_ids"][:, :10]), jnp.asarray(ref["attention_mask"][:, :10])
    out = generate(model, v, ids, mask, max_new_tokens=8)  # 18 tokens > the windows of 6
    seq, m = ids, mask
    for _ in range(8):
        nxt = jnp.argmax(model.apply(v, seq, m)[:, -1], axis=-1)
        seq = jnp.concatenate([seq, nxt[:, None].astype(seq.dtype)], axis=1)
        m = jnp.concatenate([m, jnp.ones((2, 1), m.dtype)], axis=1)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(seq))


def test_generation_compiles_once_per_prompt_length_bucket():
    """Prompts of 10, 11, 13 and 16 tokens share the 16-token bucket: one compilation, and the
    same tokens as without the bucket's extra left padding; 17 tokens open the next bucket."""
    from qlora_jax.nn.generate import _generate, prompt_bucket

    assert [prompt_bucket(n) for n in (1, 16, 17, 32, 33, 100)] == [16, 16, 32, 32, 64, 128]
    ref = reference("qwen2")
    model, v = load_pretrained(HF / "qwen2", quant=None, dtype=jnp.float32, progress=False)
    ids, mask = np.asarray(ref["input_ids"][:, :10]), np.asarray(ref["attention_mask"][:, :10])
    before = _generate._cache_size()
    for width in (10, 11, 13, 16):
        extra = width - 10  # more left padding: the same prompts
        wide_ids, wide_mask = np.pad(ids, ((0, 0), (extra, 0))), np.pad(mask, ((0, 0), (extra, 0)))
        out = generate(model, v, jnp.asarray(wide_ids), jnp.asarray(wide_mask), max_new_tokens=4)
        assert out.shape == (2, width + 4)
        np.testing.assert_array_equal(np.asarray(out)[:, :width], wide_ids)
        if width == 10:
            new = np.asarray(out)[:, 10:]
            exact = generate(model, v, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=4, bucket=False)
            np.testing.assert_array_equal(np.asarray(exact)[:, 10:], new)
        np.testing.assert_array_equal(np.asarray(out)[:, width:], new)
    assert _generate._cache_size() - before == 2  # the 16 bucket, and the unbucketed call
    generate(model, v, jnp.asarray(np.pad(ids, ((0, 0), (7, 0)))), jnp.asarray(np.pad(mask, ((0, 0), (7, 0)))),
             max_new_tokens=4)  # fmt: skip
    assert _generate._cache_size() - before == 3


def test_quantized_generation_runs_the_same_path():
    ref = reference("llama_gqa")
    model, v = load_pretrained(HF / "llama_gqa", quant=QuantConfig(), dtype=jnp.float32, progress=False)
    ids = jnp.asarray(ref["input_ids"][:1, :6])
    out = generate(model, v, ids, max_new_tokens=4)
    seq = ids
    for _ in range(4):
        seq = jnp.concatenate([seq, jnp.argmax(model.apply(v, seq)[:, -1], -1)[:, None].astype(seq.dtype)], 1)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(seq))


def test_sampling_with_tiny_top_p_is_greedy_and_temperature_samples():
    ref = reference("llama_gqa")
    model, v = load_pretrained(HF / "llama_gqa", quant=None, dtype=jnp.float32, progress=False)
    ids = jnp.asarray(ref["input_ids"][:1, :6])
    greedy = generate(model, v, ids, max_new_tokens=5)
    nucleus = generate(model, v, ids, max_new_tokens=5, temperature=1.0, top_p=1e-6, rng=jax.random.key(7))
    np.testing.assert_array_equal(greedy, nucleus)
    samples = {
        tuple(np.asarray(generate(model, v, ids, max_new_tokens=5, temperature=1.5, rng=jax.random.key(i)))[0])
        for i in range(4)
    }
    assert len(samples) > 1
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, v, ids, max_new_tokens=0)
    # several stop ids (a chat model's end-of-turn and its EOS): a row ends at the first of either
    new = np.asarray(greedy)[0, 6:]
    stop = int(new[2])
    first = int(np.flatnonzero(new == stop)[0])
    other = next(i for i in range(256) if i not in new)  # never generated here
    out = np.asarray(generate(model, v, ids, max_new_tokens=5, eos_token_id=(other, stop)))[0, 6:]
    np.testing.assert_array_equal(out[: first + 1], new[: first + 1])
    assert (out[first:] == stop).all()


def _tiny(**kw):
    return LlamaForCausalLM(LlamaConfig(), **kw)


def test_lora_targets_and_frozen_layout():
    ids = jnp.ones((1, 4), jnp.int32)
    v = _tiny(lora=LoRAConfig(rank=4, targets=("q_proj", "v_proj")), quant=QuantConfig()).init(jax.random.key(0), ids)
    params, _ = split_params(v)
    assert set(params) == {"layers"}  # scanned: one stacked subtree
    assert set(params["layers"]) == {"self_attn"} and set(params["layers"]["self_attn"]) == {"q_proj", "v_proj"}
    assert params["layers"]["self_attn"]["q_proj"]["lora_a"].shape == (2, 4, 64)  # [L, r, in]
    v = _tiny(lora=LoRAConfig(rank=4), quant=QuantConfig()).init(jax.random.key(0), ids)
    q = v["base"]["layers"]["mlp"]["down_proj"]["kernel"]
    assert q.shape == (64, 128) and q.packed.shape == (2, 64 * 128 // 2)  # per-layer shape, stacked arrays
    layer = unstack_layers(v["params"])["layers_1"]
    assert set(layer["self_attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(layer["mlp"]) == {"gate_proj", "up_proj", "down_proj"}
    f = unstack_layers(v["base"])
    assert isinstance(f["layers_0"]["mlp"]["down_proj"]["kernel"], quant.QuantizedTensor)
    for leaf in (f["embed_tokens"]["embedding"], f["norm"]["weight"], f["lm_head"]["kernel"],
                 f["layers_0"]["input_layernorm"]["weight"]):  # fmt: skip
        assert not isinstance(leaf, quant.QuantizedTensor) and leaf.dtype == jnp.bfloat16


def test_lora_targets_are_validated_and_lists_accepted():
    ids = jnp.ones((1, 4), jnp.int32)
    cfg = LoRAConfig(rank=2, targets=["up_proj"])  # a list, as a user writes it
    assert cfg.targets == ("up_proj",)
    v = _tiny(lora=cfg, scan_layers=False).init(jax.random.key(0), ids)
    assert set(v["params"]) == {"layers_0", "layers_1"} and set(v["params"]["layers_0"]) == {"mlp"}
    hash(_tiny(lora=cfg))  # modules must stay hashable (jit static arguments)
    with pytest.raises(ValueError, match=r"LoRA targets \['qproj'\] name no linear"):
        _tiny(lora=LoRAConfig(rank=2, targets=("qproj",))).init(jax.random.key(0), ids)


def test_remat_gives_the_same_loss_and_grads():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)), jnp.int32)
    plain = _tiny(lora=LoRAConfig(rank=4, dropout=0.0), quant=QuantConfig(), dtype=jnp.float32)
    v = plain.init(jax.random.key(0), ids)
    v["params"] = jax.tree.map(lambda a: a + 0.01, v["params"])  # nonzero B: real adapter grads
    params, frozen = split_params(v)

    def loss(model, p):
        return jnp.mean(model.apply({"params": p, "base": frozen}, ids) ** 2)

    for policy in ("nothing_saveable", "save_linears", "offload_linears", "dots_saveable"):
        remat = _tiny(
            lora=LoRAConfig(rank=4, dropout=0.0),
            quant=QuantConfig(),
            dtype=jnp.float32,
            remat=True,
            remat_policy=policy,
        )
        la, ga = jax.value_and_grad(lambda p: loss(plain, p))(params)
        lb, gb = jax.value_and_grad(lambda p, remat=remat: loss(remat, p))(params)
        np.testing.assert_allclose(la, lb, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), ga, gb)


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_layers_equal_unrolled_ones(remat):
    """The same weights give the same loss and adapter grads scanned (one compiled block) or unrolled."""
    cfg = LlamaConfig(num_hidden_layers=3)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)), jnp.int32)
    kw = dict(lora=LoRAConfig(rank=4, dropout=0.0), quant=QuantConfig(), dtype=jnp.float32, remat=remat)
    unrolled = LlamaForCausalLM(cfg, scan_layers=False, **kw)
    scanned = LlamaForCausalLM(cfg, **kw)
    v = unrolled.init(jax.random.key(0), ids)
    v["params"] = jax.tree.map(lambda a: a + 0.01, v["params"])  # nonzero B: real adapter grads
    params, frozen = split_params(v)
    s_params, s_frozen = stack_layers(params), stack_layers(frozen)
    assert jax.tree.structure(s_frozen) == jax.tree.structure(scanned.init(jax.random.key(0), ids)["base"])

    def loss(model, p, f):
        return jnp.mean(model.apply({"params": p, "base": f}, ids) ** 2)

    la, ga = jax.value_and_grad(lambda p: loss(unrolled, p, frozen))(params)
    lb, gb = jax.value_and_grad(lambda p: loss(scanned, p, s_frozen))(s_params)
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), ga, unstack_layers(gb))


def test_scanned_layers_refuse_a_per_layer_storage():
    ids = jnp.ones((1, 4), jnp.int32)
    model = _tiny(quant=QuantConfig(skip_modules=("layers.1.mlp.down_proj",)))
    with pytest.raises(ValueError, match=r"mlp.down_proj differently in different layers.*scan_layers=False"):
        model.init(jax.random.key(0), ids)
    v = model.clone(scan_layers=False).init(jax.random.key(0), ids)
    assert not quant.is_quantized(v["base"]["layers_1"]["mlp"]["down_proj"]["kernel"])
    assert quant.is_quantized(v["base"]["layers_0"]["mlp"]["down_proj"]["kernel"])
    _tiny(quant=QuantConfig(skip_modules=("down_proj",))).init(jax.random.key(0), ids)  # every layer alike: fine


def test_config_reads_transformers_4_form_and_rejects_unsupported():
    v4 = {
        "model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 5e5,
        "rope_scaling": {"type": "linear", "factor": 2.0}, "torch_dtype": "bfloat16",
    }  # fmt: skip
    cfg = LlamaConfig.from_hf(v4)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling_dict == {"rope_type": "linear", "factor": 2.0}
    assert cfg.num_key_value_heads == 2
    np.testing.assert_allclose(rope_inv_freq(cfg), rope_inv_freq(LlamaConfig.from_hf({**v4, "rope_scaling": None})) / 2)
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        LlamaConfig.from_hf({**v4, "model_type": "gpt2"})
    with pytest.raises(ValueError, match=r"missing keys \['hidden_size'\]"):
        LlamaConfig.from_hf({k: x for k, x in v4.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="rope scaling type 'yarn' is not supported"):
        LlamaConfig.from_hf({**v4, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        LlamaConfig.from_hf({**v4, "hidden_act": "gelu"})
