"""Model presets (qlora_jax.nn.presets): LLaMA-1/2 shapes against the published parameter counts, and
model_config reading a preset name, a config.json or its directory."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.nn import PRESETS, LlamaConfig, LlamaForCausalLM, model_config, preset

# Published parameter counts: LLaMA-7B and LLaMA-2-70B to three digits; 13B/33B/65B as the LLaMA
# paper's table 2 (Touvron et al. 2023) rounds them. LLaMA-2-7B/13B have LLaMA-1's shapes (positions
# are rotary: no parameters), so LLaMA-1's counts.
PUBLISHED = {
    "llama-7b": 6.74e9,
    "llama-13b": 13.0e9,
    "llama-33b": 32.5e9,
    "llama-30b": 32.5e9,
    "llama-65b": 65.2e9,
    "llama-2-7b": 6.74e9,
    "llama-2-13b": 13.0e9,
    "llama-2-70b": 68.98e9,
}

# meta-llama/Llama-2-70b-hf's config.json
LLAMA2_70B_JSON = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 8192, "initializer_range": 0.02, "intermediate_size": 28672, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000,
}  # fmt: skip


def count_from_shapes(cfg: LlamaConfig) -> int:
    """Embedding + lm_head + the seven linears of each block + its two RMSNorms + the final norm."""
    d, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.dim_head
    attention = d * cfg.num_attention_heads * cfg.dim_head * 2 + d * kv * 2  # q, o; k, v
    block = attention + 3 * d * f + 2 * d
    embeddings = cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2)
    return embeddings + cfg.num_hidden_layers * block + d


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_figures(name):
    cfg = preset(name)
    n = count_from_shapes(cfg)
    assert abs(n / PUBLISHED[name] - 1) <= 0.005, (name, n)
    if name in ("llama-7b", "llama-2-70b"):  # the model itself builds exactly these shapes
        shapes = jax.eval_shape(
            lambda: LlamaForCausalLM(cfg).init(jax.random.key(0), jnp.ones((1, 1), jnp.int32))
        )  # fmt: skip
        assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == n


def test_the_presets_shapes():
    assert sorted(PRESETS) == [
        "llama-13b", "llama-2-13b", "llama-2-70b", "llama-2-7b", "llama-30b", "llama-33b", "llama-65b", "llama-7b",
        "mixtral-8x7b", "qwen3-30b-a3b",
    ]  # fmt: skip
    for name, cfg in PRESETS.items():
        if not name.startswith("llama"):
            continue
        llama2 = name.startswith("llama-2-")
        assert (cfg.vocab_size, cfg.tie_word_embeddings, cfg.model_type) == (32000, False, "llama"), name
        assert (cfg.max_position_embeddings, cfg.rms_norm_eps) == ((4096, 1e-5) if llama2 else (2048, 1e-6)), name
        assert cfg.dim_head == 128 and cfg.rope_theta == 10000.0, name
        if name != "llama-2-70b":
            assert cfg.num_key_value_heads == cfg.num_attention_heads, name
    big = preset("llama-2-70b")
    assert (big.hidden_size, big.intermediate_size, big.num_hidden_layers) == (8192, 28672, 80)
    assert (big.num_attention_heads, big.num_key_value_heads) == (64, 8)
    assert preset("LLaMA-30B") == preset("llama-33b")  # one model, two names; case does not matter


# the model cards: Mixtral-8x7B 46.7B parameters (46,702,792,704 in its safetensors index), Qwen3-30B-A3B
# 30.5B in total and 3.3B activated (8 of 128 experts)
MOE_PUBLISHED = {"mixtral-8x7b": (46.7e9, None), "qwen3-30b-a3b": (30.5e9, 3.3e9)}


@pytest.mark.parametrize("name", sorted(MOE_PUBLISHED))
def test_the_moe_presets_build_their_published_parameter_counts(name):
    cfg = preset(name)
    shapes = jax.eval_shape(lambda: LlamaForCausalLM(cfg).init(jax.random.key(0), jnp.ones((1, 1), jnp.int32)))
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    total = sum(int(np.prod(x.shape)) for _, x in flat)
    total_published, active_published = MOE_PUBLISHED[name]
    assert abs(total / total_published - 1) <= 0.005, total
    if active_published:  # embeddings, attention and router, plus k of the E experts
        experts = sum(int(np.prod(x.shape)) for p, x in flat if "experts" in jax.tree_util.keystr(p))
        active = total - experts + experts * cfg.num_experts_per_tok // cfg.num_experts
        assert abs(active / active_published - 1) <= 0.02, active


def test_an_unknown_preset_is_refused_listing_the_names():
    with pytest.raises(
        ValueError, match=r"no model preset 'llama-3-8b'; the presets: \['llama-13b', .*'qwen3-30b-a3b'\]"
    ):
        preset("llama-3-8b")


def test_model_config_reads_a_preset_a_config_json_or_its_directory(tmp_path):
    assert model_config("llama-7b") == preset("llama-7b") and model_config("Llama-2-70B") == preset("llama-2-70b")
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_70B_JSON))
    assert model_config(str(tmp_path / "config.json")) == preset("llama-2-70b")
    assert model_config(str(tmp_path)) == preset("llama-2-70b")
    with pytest.raises(ValueError, match=r"--model: '.*nope' is neither a built-in \(\['llama-13b', .*\]\) nor a"):
        model_config(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA2_70B_JSON, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config.json: model_type 'gpt2' is not supported"):
        model_config(str(tmp_path))
