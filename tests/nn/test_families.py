"""Qwen3, Gemma 1/2/3, Phi-3 and the MoEs against transformers: each family's own math, its config forms, exports.

The fp32 logits of every family are compared with transformers' in test_llama.py (``VARIANTS``)
and their bitsandbytes 4-bit checkpoints in tests/checkpoints/test_hf.py; here each feature the
fixtures were made to exercise (make_family_fixtures.py) is shown to matter at all, so that a
parity test would catch it missing.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import HF, reference

from qlora_jax.checkpoints import config_to_hf, export_hf, load_pretrained, read_config
from qlora_jax.checkpoints.gguf import write_gguf
from qlora_jax.nn import LlamaConfig

FEATURES = [
    ("qwen3", {"qk_norm": False}),
    ("qwen3", {"layer_types": None, "sliding_window": None}),  # sliding from max_window_layers=1 on
    ("gemma", {"embed_scale": False}),
    ("gemma", {"norm_unit_offset": False}),
    ("gemma", {"hidden_act": "silu"}),
    ("gemma2", {"attn_logit_softcapping": None}),
    ("gemma2", {"final_logit_softcapping": None}),
    ("gemma2", {"query_pre_attn_scalar": None}),
    ("gemma2", {"sandwich_norms": False}),
    ("gemma2", {"layer_types": None, "sliding_window": None}),
    ("gemma3_text", {"local_rope_theta": None}),
    ("gemma3_text", {"rope_scaling": None}),
    ("gemma3_text", {"qk_norm": False}),
    ("phi3", {"sliding_window": None}),  # every layer sliding (6 < 16 tokens)
    ("mixtral", {"sliding_window": None}),
    ("mixtral", {"num_experts_per_tok": 1}),
    ("qwen2_moe", {"shared_expert_intermediate_size": 0}),  # no shared expert
    ("qwen3_moe", {"qk_norm": False}),
]
# renormalizing the top-2 weights (or not) moves these logits by 3.4e-3: 34x the parity tolerance
SMALLER_FEATURES = [
    ("mixtral", {"norm_topk_prob": False}),  # Mixtral always renormalizes its top-2
    ("qwen2_moe", {"norm_topk_prob": True}),  # this one does not
    ("qwen3_moe", {"norm_topk_prob": False}),
]


def _max_error(model, v, ref) -> float:
    logits = model.apply(v, ref["input_ids"], ref["attention_mask"], ref["position_ids"])
    return float(np.abs(np.asarray(logits) - ref["logits"])[ref["attention_mask"].astype(bool)].max())


@pytest.mark.parametrize(("name", "change"), FEATURES, ids=lambda x: x if isinstance(x, str) else ",".join(x))
def test_each_family_feature_moves_the_logits_far_past_the_parity_tolerance(name, change):
    ref = reference(name)
    model, v = load_pretrained(HF / name, quant=None, dtype=jnp.float32, progress=False)
    assert _max_error(model, v, ref) <= 1e-4  # as test_fp32_logits_match_transformers
    without = model.clone(config=dataclasses.replace(model.config, **change))
    assert _max_error(without, v, ref) > 1e-2


@pytest.mark.parametrize(("name", "change"), SMALLER_FEATURES, ids=lambda x: x if isinstance(x, str) else ",".join(x))
def test_moe_renormalization_moves_the_logits_past_ten_times_the_parity_tolerance(name, change):
    ref = reference(name)
    model, v = load_pretrained(HF / name, quant=None, dtype=jnp.float32, progress=False)
    without = model.clone(config=dataclasses.replace(model.config, **change))
    assert _max_error(without, v, ref) > 1e-3


def test_family_configs_are_read_as_transformers_reads_them():
    cfgs = {name: read_config(HF / name)[0] for name in ("qwen3", "gemma", "gemma2", "gemma3_text")}
    assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].layer_types == ("full_attention", "sliding_attention")
    assert cfgs["gemma"].tie_word_embeddings and cfgs["gemma"].hidden_act == "gelu_pytorch_tanh"
    assert cfgs["gemma"].sliding_window is None and not cfgs["gemma"].sandwich_norms
    g2 = cfgs["gemma2"]
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping, g2.query_pre_attn_scalar) == (0.5, 3.0, 24)
    assert g2.sliding_layers == (True, False)
    g3 = cfgs["gemma3_text"]
    assert g3.local_rope_theta == 10_000.0 and g3.rope_theta == 1_000_000.0
    assert g3.rope_scaling_dict == {"rope_type": "linear", "factor": 8.0}
    assert g3.attn_logit_softcapping is None and g3.qk_norm and g3.sandwich_norms
    phi3 = read_config(HF / "phi3")[0]
    assert phi3.fused_projections and phi3.sliding_layers == (True, True) and phi3.layer_types is None
    assert phi3.linear_names == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def test_transformers_4_forms_derive_the_layer_types():
    base = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2}
    # Qwen2/3: the window from max_window_layers on, and only with use_sliding_window
    qwen = {**base, "model_type": "qwen2", "num_hidden_layers": 4, "sliding_window": 8, "max_window_layers": 2}
    assert LlamaConfig.from_hf({**qwen, "use_sliding_window": True}).sliding_layers == (False, False, True, True)
    assert LlamaConfig.from_hf(qwen).sliding_window is None
    # Gemma 2: every other layer, the first sliding; soft-capping by default
    g2 = LlamaConfig.from_hf({**base, "model_type": "gemma2", "num_hidden_layers": 3, "sliding_window": 4})
    assert g2.sliding_layers == (True, False, True)
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping) == (50.0, 30.0)
    # Gemma 3, 4.x keys: sliding_window_pattern, rope_local_base_freq, rope_scaling for the global layers
    g3 = LlamaConfig.from_hf({
        **base, "model_type": "gemma3_text", "num_hidden_layers": 7, "sliding_window": 4, "rope_theta": 1e6,
        "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    })  # fmt: skip
    assert g3.sliding_layers == (True,) * 5 + (False, True)
    assert g3.local_rope_theta == 1e4 and g3.rope_theta == 1e6 and g3.rope_scaling_dict["factor"] == 8.0
    # the activation's key, as transformers reads it: Gemma's hidden_act (legacy "gelu" = the tanh
    # approximation), Gemma 2/3's hidden_activation (their hidden_act is not read)
    gemma = {**base, "num_hidden_layers": 1}
    assert LlamaConfig.from_hf({**gemma, "model_type": "gemma", "hidden_act": "gelu"}).hidden_act == "gelu_pytorch_tanh"
    g2_silu = {**gemma, "model_type": "gemma2", "hidden_act": "silu", "hidden_activation": "gelu_pytorch_tanh"}
    assert LlamaConfig.from_hf(g2_silu).hidden_act == "gelu_pytorch_tanh"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 changes the math"),
        ({"attention_dropout": 0.1}, "attention_dropout=0.1 changes the math"),
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
        ({"hidden_activation": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"model_type": "gemma3"}, "vision-language wrapper"),
        ({"model_type": "phi"}, "model_type 'phi' is not supported"),
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.75}},
            "partial_rotary_factor=0.75 changes the math",
        ),
        ({"resid_pdrop": 0.1}, "resid_pdrop=0.1 changes the math"),
    ],
)
def test_a_config_key_whose_math_is_not_implemented_is_refused_by_name(change, match):
    _, raw = read_config(HF / "gemma3_text")
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_hf({**raw, **change})


def test_phi3_128ks_longrope_is_refused_naming_the_file():
    _, raw = read_config(HF / "phi3")
    longrope = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    with pytest.raises(ValueError, match=r"phi3/config\.json: rope scaling type 'longrope' is not supported"):
        LlamaConfig.from_hf({**raw, "rope_parameters": longrope}, source=str(HF / "phi3" / "config.json"))


@pytest.mark.parametrize(
    "name",
    ["qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "mistral", "qwen2", "llama3_rope", "mixtral", "qwen2_moe",
     "qwen3_moe"],
)  # fmt: skip
def test_config_to_hf_reads_back_to_the_same_config(name):
    cfg = read_config(HF / name)[0]
    cfg = dataclasses.replace(cfg, head_dim=cfg.dim_head)  # config_to_hf writes the head_dim it implies
    assert LlamaConfig.from_hf(config_to_hf(cfg)) == cfg


@pytest.mark.parametrize("name", ["gemma2", "gemma3_text", "phi3", "mixtral", "qwen2_moe"])
def test_a_merged_export_loads_back_with_the_same_logits(tmp_path, name):
    model, v = load_pretrained(HF / name, quant=None, dtype=jnp.float32, progress=False, scan_layers=False)
    export_hf(tmp_path / "out", model.config, v["base"])
    back, w = load_pretrained(tmp_path / "out", quant=None, dtype=jnp.float32, progress=False, scan_layers=False)
    assert back.config == dataclasses.replace(model.config, head_dim=model.config.dim_head)  # written explicitly
    jax.tree.map(np.testing.assert_array_equal, v["base"], w["base"])
    assert _max_error(back, w, reference(name)) <= 1e-4


def test_gguf_export_of_a_family_without_a_writer_is_refused(tmp_path):
    cfg = read_config(HF / "gemma2")[0]
    with pytest.raises(ValueError, match="model_type 'gemma2' has no GGUF writer"):
        write_gguf(tmp_path / "m.gguf", cfg, {}, None)


def test_a_gemma3_checkpoint_fine_tunes_and_exports_as_gemma3(tmp_path):
    """QLoRA on a bf16 Gemma 3 checkpoint through the entry point: the exports are Gemma 3 again
    (merged, bnb 4-bit, PEFT adapter on the seven linears); GGUF export is refused before training."""
    import json

    from finetune_cli import metrics, run

    from qlora_jax import quant
    from qlora_jax.data import ByteTokenizer
    from qlora_jax.nn import LlamaForCausalLM

    tok = ByteTokenizer()
    cfg = dataclasses.replace(
        read_config(HF / "gemma3_text")[0], vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
    )  # fmt: skip
    base = LlamaForCausalLM(cfg, dtype=jnp.float32).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["base"]
    export_hf(tmp_path / "gemma3", cfg, base, dtype=jnp.bfloat16)
    tok.save(tmp_path / "gemma3")
    model = f"--config.model_path={tmp_path / 'gemma3'}"
    refused = run(tmp_path / "gguf", model, "--config.export.gguf=f16", check=False)
    assert refused.returncode != 0 and "config.export.gguf='f16'" in refused.stderr
    assert not (tmp_path / "gguf" / "metrics.jsonl").exists()

    run(tmp_path / "run", model, "--config.train.steps=4", "--config.export.merged=True",
        "--config.export.quantized=True")  # fmt: skip
    rows = metrics(tmp_path / "run")
    assert rows[-1]["step"] == 4 and np.isfinite(rows[-1]["loss"])
    export = tmp_path / "run" / "export"
    for kind in ("merged", "quantized"):
        assert read_config(export / kind)[0] == dataclasses.replace(cfg, head_dim=16), kind
    stored, q = load_pretrained(export / "quantized", quant=None, progress=False, scan_layers=False)
    qts = [x for x in jax.tree.leaves(q["base"], is_leaf=quant.is_quantized) if quant.is_quantized(x)]
    assert len(qts) == 14 and stored.quant.weight_dtype == "bfloat16"  # as the bf16 checkpoint's
    adapter = json.loads((export / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


def test_a_peft_adapter_on_phi3s_fused_linears_gives_pefts_logits_and_exports_to_its_file(tmp_path):
    """A PEFT 0.21 adapter (random B) on qkv_proj / o_proj / gate_up_proj / down_proj
    (make_peft_fixture.py): its tensors, read by PEFT's names, give PEFT's float32 logits; written
    back by export_peft_adapter they are PEFT's file, name for name and value for value."""
    import json

    from flax import traverse_util
    from safetensors.numpy import load_file

    from qlora_jax.checkpoints import export_peft_adapter
    from qlora_jax.nn import LoRAConfig

    src = HF.parent / "peft" / "phi3_r4"
    theirs = load_file(src / "adapter_model.safetensors")
    peft_cfg = json.loads((src / "adapter_config.json").read_text())
    lora = LoRAConfig(rank=peft_cfg["r"], alpha=peft_cfg["lora_alpha"], dropout=0.0,
                      targets=tuple(sorted(peft_cfg["target_modules"])))  # fmt: skip
    model, v = load_pretrained(HF / "phi3", quant=None, lora=lora, dtype=jnp.float32, progress=False, scan_layers=False)
    flat = {}
    for name, x in theirs.items():  # base_model.model.model.layers.{i}.{block}.{module}.lora_{A|B}.weight
        i, block, module, kind = name.split(".")[4:8]
        flat[(f"layers_{i}", block, module, kind.lower())] = jnp.asarray(x)
    params = traverse_util.unflatten_dict(flat)
    assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, v["params"])
    ref = dict(np.load(src / "reference.npz"))
    logits = np.asarray(model.apply({**v, "params": params}, ref["input_ids"], ref["attention_mask"],
                                    ref["position_ids"]))  # fmt: skip
    real = ref["attention_mask"].astype(bool)
    scale = np.abs(ref["logits"][real]).max()
    assert np.abs(logits - ref["logits"])[real].max() <= 1e-4 * scale
    assert np.abs(ref["base_logits"] - ref["logits"])[real].max() > 1e-2 * scale  # the adapters matter
    export_peft_adapter(tmp_path, params, lora, None)
    ours = load_file(tmp_path / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in theirs:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(peft_cfg["target_modules"]) and cfg["r"] == peft_cfg["r"]


def _byte_checkpoint(root, name: str):
    """A random checkpoint of fixture ``name``'s architecture with the byte tokenizer, for the CLI."""
    from qlora_jax.data import ByteTokenizer
    from qlora_jax.nn import LlamaForCausalLM

    tok = ByteTokenizer()
    cfg = dataclasses.replace(read_config(HF / name)[0], vocab_size=tok.vocab_size)
    base = LlamaForCausalLM(cfg, dtype=jnp.float32).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["base"]
    export_hf(root / name, cfg, base)
    tok.save(root / name)
    return root / name


def test_llamas_lora_targets_on_phi3_are_refused_naming_the_config_key(tmp_path):
    from finetune_cli import run

    refused = run(tmp_path / "run", f"--config.model_path={_byte_checkpoint(tmp_path, 'phi3')}", check=False)
    assert refused.returncode != 0
    assert "config.lora.targets=" in refused.stderr
    assert "its linears: qkv_proj,o_proj,gate_up_proj,down_proj" in refused.stderr


def test_dot_product_attention_on_a_soft_capped_model_is_refused_naming_the_config_key(tmp_path):
    from finetune_cli import run

    model = f"--config.model_path={_byte_checkpoint(tmp_path, 'gemma2')}"
    refused = run(tmp_path / "run", model, "--config.train.attention=dot_product", check=False)
    assert refused.returncode != 0
    assert "config.train.attention='dot_product' cannot soft-cap" in refused.stderr
