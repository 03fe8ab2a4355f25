"""Mixtral, Qwen2-MoE and Qwen3-MoE: routing, the two dispatches, the load-balancing loss, their
bitsandbytes checkpoints, PEFT adapters on every expert, and training with the router's loss.

The fp32 logits of the three families against transformers 5.24 are in test_llama.py
(``VARIANTS``); the features that make them differ, in test_families.py.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from hf_fixtures import HF, nonzero_adapters, reference
from safetensors.numpy import load_file

from qlora_jax import parallel, quant
from qlora_jax.checkpoints import export_peft_adapter, load_pretrained, read_config, save_pretrained_4bit
from qlora_jax.checkpoints.hf import bnb_quant_config
from qlora_jax.nn import LlamaConfig, LlamaForCausalLM, LoRAConfig, QuantConfig, moe, split_params
from qlora_jax.nn.llama import ROUTER_STATS, unstack_experts, unstack_layers
from qlora_jax.nn.lora import merge_params

MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]


def _real(ref):
    return ref["attention_mask"].astype(bool)


def _tiny(model_type="qwen2_moe", **kw):
    extra = dict(moe_intermediate_size=32, shared_expert_intermediate_size=48, qkv_bias=True, norm_topk_prob=False)
    extra = extra if model_type == "qwen2_moe" else {}
    return LlamaConfig(model_type=model_type, num_experts=4, num_experts_per_tok=2, **{**extra, **kw})


def test_routing_equals_a_float64_softmax_top_k_and_renormalization():
    logits = jax.random.normal(jax.random.key(0), (50, 8)) * 3
    for normalize in (True, False):
        w, e, probs = moe.route(logits, 2, normalize)
        x = np.asarray(logits, np.float64)
        p = np.exp(x - x.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        top = np.argsort(-p, axis=-1, kind="stable")[:, :2]
        pw = np.take_along_axis(p, top, -1)
        if normalize:
            pw = pw / pw.sum(-1, keepdims=True)
        np.testing.assert_array_equal(np.asarray(e), top)
        np.testing.assert_allclose(np.asarray(w), pw, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(probs), p, rtol=1e-6)


def test_load_balancing_loss_of_a_router_that_always_picks_two_experts_is_the_expert_count():
    """f = [1, 1, 0, 0] of the rows, P = [1/2, 1/2, 0, 0]: E · sum f·P = 4 · (1/2 + 1/2) = 4; padded
    rows, routed elsewhere, count for nothing."""
    logits = jnp.tile(jnp.array([30.0, 30.0, 0.0, 0.0]), (6, 1))
    logits = logits.at[4:].set(jnp.array([0.0, 0.0, 30.0, 30.0]))  # the two padded rows
    _, experts, probs = moe.route(logits, 2, True)
    stats = moe.router_stats(probs, experts, jnp.array([1, 1, 1, 1, 0, 0]))
    np.testing.assert_allclose(float(moe.load_balancing_loss(stats)), 4.0, rtol=1e-6)


@pytest.mark.parametrize("name", MOE)
def test_the_load_balancing_loss_is_transformers(name):
    ref = reference(name)
    model, v = load_pretrained(HF / name, quant=None, dtype=jnp.float32, progress=False)
    _, state = model.apply(v, ref["input_ids"], ref["attention_mask"], ref["position_ids"], mutable=["intermediates"])
    aux = moe.load_balancing_loss(state["intermediates"][ROUTER_STATS][0])
    np.testing.assert_allclose(float(aux), float(ref["aux_loss"]), rtol=1e-5)
    assert abs(float(aux) - model.config.num_experts_per_tok) > 1e-3  # not the balanced value: the routers are skewed


@pytest.mark.parametrize("model_type", MOE)
def test_sorted_and_dense_dispatch_agree_in_values_and_adapter_gradients(model_type):
    cfg = _tiny(model_type)
    lora = LoRAConfig(rank=4, dropout=0.0, targets=cfg.linear_names)
    model = LlamaForCausalLM(cfg, lora=lora, quant=QuantConfig(), dtype=jnp.float32)
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    params, base = split_params(model.init(jax.random.key(0), ids))
    params = nonzero_adapters(params, scale=0.05)

    def loss(p, dispatch):
        return jnp.mean(model.clone(moe_dispatch=dispatch).apply(merge_params(p, base), ids) ** 2)

    (a, ga), (b, gb) = (jax.value_and_grad(loss)(params, d) for d in ("sorted", "dense"))
    np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
    expert_grads = [g for path, g in traverse_util.flatten_dict(ga).items() if "experts" in path]  # [L, E, ...]
    assert expert_grads and all(bool(jnp.all(jnp.abs(g).max(axis=(0, 2, 3)) > 0)) for g in expert_grads)  # each
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7), ga, gb)


@pytest.mark.parametrize("name", ["mixtral_bnb4bit", "qwen2_moe_bnb4bit"])
def test_bnb_checkpoint_loads_its_4bit_tensors_byte_exact_and_quantizes_its_experts(name):
    """transformers 5.24 + bitsandbytes quantize the attention, the shared expert and its gate, and
    store the experts unquantized (3-D parameters, not nn.Linear): the stored bytes load as they
    are; the experts are quantized at load with the checkpoint's settings, each on its own."""
    d = HF / name
    stored = load_file(d / "model.safetensors")
    model, v = load_pretrained(d, quant=None, dtype=jnp.float32, progress=False, scan_layers=False)
    flat = traverse_util.flatten_dict(unstack_experts(v["base"]))
    quantized = {p: x for p, x in flat.items() if quant.is_quantized(x)}
    experts = [p for p in quantized if "experts" in p]
    assert len(experts) == 2 * 4 * 3  # layers x experts x (gate, up, down)
    for path, qt in quantized.items():
        key = "model." + ".".join(path).replace("layers_", "layers.").removesuffix(".kernel") + ".weight"
        if "experts" in path:  # ours, from the file's float32 weight: bitsandbytes' layout
            assert stored[key].dtype == np.float32
            mine = bnb_quant_config(read_config(d)[1]).quantize(jnp.asarray(stored[key]))
            np.testing.assert_array_equal(np.asarray(qt.packed), np.asarray(mine.packed), err_msg=key)
            np.testing.assert_array_equal(np.asarray(qt.absmax), np.asarray(mine.absmax), err_msg=key)
        else:
            np.testing.assert_array_equal(np.asarray(qt.packed), stored[key].reshape(-1), err_msg=key)
            np.testing.assert_array_equal(np.asarray(qt.absmax), stored[key + ".absmax"], err_msg=key)
    ref = reference(name)  # transformers' logits, its 4-bit linears dequantized, the experts as stored
    logits = model.apply(v, ref["input_ids"], ref["attention_mask"], ref["position_ids"])
    assert 1e-3 < np.abs(np.asarray(logits) - ref["logits"])[_real(ref)].max() < 0.05  # the experts' 4 bits
    kept, w = load_pretrained(d, quant=QuantConfig(skip_modules=("experts",)), dtype=jnp.float32, progress=False)
    logits = kept.apply(w, ref["input_ids"], ref["attention_mask"], ref["position_ids"])
    assert np.abs(np.asarray(logits) - ref["logits"])[_real(ref)].max() <= 1e-5  # same bytes: float rounding


def test_a_4bit_save_writes_the_experts_as_transformers_does_and_loads_back(tmp_path):
    model, v = load_pretrained(HF / "qwen2_moe_bnb4bit", quant=None, dtype=jnp.float32, progress=False)
    save_pretrained_4bit(tmp_path, read_config(HF / "qwen2_moe_bnb4bit")[1], v["base"], compute_dtype="float32")
    ours, theirs = load_file(tmp_path / "model.safetensors"), load_file(HF / "qwen2_moe_bnb4bit" / "model.safetensors")
    assert ours.keys() == theirs.keys()  # the experts unquantized, the linears in bitsandbytes' form
    for k in theirs:
        if "experts" not in k:
            np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    flat = traverse_util.flatten_dict(unstack_layers(v["base"]))
    up = jax.tree.map(lambda a: a[2], flat[("layers_1", "mlp", "experts", "up_proj", "kernel")])  # expert 2
    np.testing.assert_array_equal(ours["model.layers.1.mlp.experts.2.up_proj.weight"], quant.dequantize(up))
    back, w = load_pretrained(tmp_path, quant=None, dtype=jnp.float32, progress=False)
    ref = reference("qwen2_moe_bnb4bit")
    a = model.apply(v, ref["input_ids"], ref["attention_mask"], ref["position_ids"])
    b = back.apply(w, ref["input_ids"], ref["attention_mask"], ref["position_ids"])
    assert np.abs(np.asarray(a) - np.asarray(b))[_real(ref)].max() < 1e-3  # the experts re-quantized


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_an_adapter_on_every_expert_exports_as_peft_loads_it_with_pefts_logits(tmp_path, name):
    """make_moe_peft_fixture.py: adapters from nonzero_adapters, exported by export_peft_adapter and
    loaded by PEFT 0.21 into transformers 5.24 (which converts the per-expert adapters to its fused
    form); the same adapters exported here are that file, and give PEFT's logits."""
    src = HF.parent / "peft" / f"{name}_r4"
    cfg = read_config(HF / name)[0]
    lora = LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=cfg.linear_names)
    model, v = load_pretrained(HF / name, quant=None, lora=lora, dtype=jnp.float32, progress=False)
    params = nonzero_adapters(v["params"])
    export_peft_adapter(tmp_path, params, lora, name)
    ours, theirs = load_file(tmp_path / "adapter_model.safetensors"), load_file(src / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    expert = "block_sparse_moe.experts.3.w1" if name == "mixtral" else "mlp.experts.3.gate_proj"
    assert f"base_model.model.model.layers.1.{expert}.lora_A.weight" in ours
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written == json.loads((src / "adapter_config.json").read_text())
    ref = dict(np.load(src / "reference.npz"))
    logits = np.asarray(model.apply({**v, "params": params}, ref["input_ids"], ref["attention_mask"],
                                    ref["position_ids"]))  # fmt: skip
    real, scale = _real(ref), np.abs(ref["logits"]).max()
    assert np.abs(logits - ref["logits"])[real].max() <= 1e-4 * scale
    assert np.abs(ref["base_logits"] - ref["logits"])[real].max() > 0.1 * scale  # the adapters matter


def test_expert_adapters_export_with_no_dropout_which_pefts_expert_wrapper_refuses(tmp_path):
    cfg = _tiny("qwen3_moe")
    lora = LoRAConfig(rank=2, dropout=0.1, targets=("q_proj", "down_proj"))
    model = LlamaForCausalLM(cfg, lora=lora, dtype=jnp.float32)
    params, _ = split_params(model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32)))
    export_peft_adapter(tmp_path / "moe", params, lora, None)
    assert json.loads((tmp_path / "moe" / "adapter_config.json").read_text())["lora_dropout"] == 0.0
    attn = {"layers": {"self_attn": params["layers"]["self_attn"]}}  # no expert adapters: as configured
    export_peft_adapter(tmp_path / "attn", attn, lora, None)
    assert json.loads((tmp_path / "attn" / "adapter_config.json").read_text())["lora_dropout"] == 0.1


def test_mixtrals_linears_are_its_checkpoints_names():
    cfg = read_config(HF / "mixtral")[0]
    assert cfg.linear_names == ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3")
    model = LlamaForCausalLM(cfg, lora=LoRAConfig(rank=2), dtype=jnp.float32)  # LLaMA's seven names
    with pytest.raises(ValueError, match=r"LoRA targets \['down_proj', 'gate_proj', 'up_proj'\] name no linear of "
                                         r"this mixtral model; its linears: .*'w1', 'w2', 'w3'"):  # fmt: skip
        model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))
    assert read_config(HF / "qwen2_moe")[0].linear_names[-1] == "shared_expert_gate"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"router_jitter_noise": 0.1}, r"router_jitter_noise=0.1 changes the math"),
        ({"decoder_sparse_step": 2}, r"decoder_sparse_step=2 changes the math"),
        ({"mlp_only_layers": [1]}, r"mlp_only_layers=\[1\] changes the math"),
        ({"use_sliding_window": True, "sliding_window": 4}, r"use_sliding_window=True is not implemented for"),
        ({"num_experts_per_tok": 9}, r"num_experts_per_tok must be in 1..num_experts \(4\); got 9"),
    ],
)
def test_an_moe_config_key_we_do_not_implement_is_refused_by_name(change, match):
    raw = read_config(HF / "qwen3_moe")[1]
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_hf({**raw, **change}, source="qwen3_moe/config.json")


def test_single_experts_in_skip_modules_are_refused_naming_the_field():
    with pytest.raises(
        ValueError, match=r"QuantConfig.skip_modules: \['layers.1.mlp.experts.3.gate_proj'\] pick single"
    ):
        QuantConfig(skip_modules=("layers.1.mlp.experts.3.gate_proj",))
    QuantConfig(skip_modules=("layers.1.mlp.experts.gate_proj", "experts"))  # a linear of every expert: fine


def test_the_planner_counts_a_moe_models_4bit_experts_exactly():
    from qlora_jax.train import memory

    cfg = read_config(HF / "qwen2_moe")[0]
    lora = LoRAConfig(rank=4, dropout=0.1, targets=cfg.linear_names, dtype=jnp.bfloat16)
    plan = memory.plan(cfg, QuantConfig(), lora, batch=2, seq_len=16)
    base = jax.eval_shape(
        LlamaForCausalLM(cfg, quant=QuantConfig()).init, jax.random.key(0), jnp.ones((1, 4), jnp.int32)
    )
    qts = [x for x in jax.tree.leaves(base["base"], is_leaf=quant.is_quantized) if quant.is_quantized(x)]
    stored = sum(sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(q)) for q in qts)
    assert plan.frozen_quantized == stored and len(qts) == 4 + 3 + 3 + 1  # attention, experts, shared, its gate


def test_a_run_saved_before_the_router_loss_existed_resumes():
    from qlora_jax.train.validate import changed_keys

    assert changed_keys({"train": {}}, {"train": {"router_aux_loss_coef": 0.0}}) == []
    assert changed_keys({"train": {}}, {"train": {"router_aux_loss_coef": 0.02}}) == [
        ("train.router_aux_loss_coef", None, 0.02)
    ]


def test_experts_split_over_fsdp_by_each_experts_rows():
    """A stacked [L, E] expert linear: each expert's rows split block-aligned, the layer and
    expert axes whole (parallel.quantized_spec)."""
    cfg = dataclasses.replace(_tiny("qwen3_moe"), hidden_size=512, moe_intermediate_size=512)
    model = LlamaForCausalLM(cfg, quant=QuantConfig(), dtype=jnp.float32)
    base = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 4), jnp.int32))["base"]
    specs = parallel.base_specs(base, 2)
    qt = base["layers"]["mlp"]["experts"]["gate_proj"]["kernel"]
    spec = specs["layers"]["mlp"]["experts"]["gate_proj"]["kernel"]
    assert qt.packed.shape[:2] == (2, 4) and tuple(spec.packed) == (None, None, "fsdp")


def test_training_adds_the_load_balancing_loss_with_its_coefficient():
    from qlora_jax.train.steps import token_loss

    model, v = load_pretrained(HF / "qwen3_moe", quant=None, lora=LoRAConfig(rank=4, dropout=0.0), dtype=jnp.float32,
                               progress=False)  # fmt: skip
    ref = reference("qwen3_moe")
    batch = {"input_ids": jnp.asarray(ref["input_ids"]), "attention_mask": jnp.asarray(ref["attention_mask"]),
             "loss_mask": jnp.asarray(ref["attention_mask"])}  # fmt: skip
    params = nonzero_adapters(v["params"], scale=0.05)
    plain, n = token_loss(model, params, v["base"], batch, None, True)
    with_aux, n2 = token_loss(model, params, v["base"], batch, None, True, router_aux_loss_coef=0.5)
    _, state = model.apply({**v, "params": params}, batch["input_ids"], batch["attention_mask"],
                           mutable=["intermediates"])  # fmt: skip
    aux = float(moe.load_balancing_loss(state["intermediates"][ROUTER_STATS][0]))
    assert int(n) == int(n2) and aux > 1.0
    np.testing.assert_allclose(float(with_aux) / int(n), float(plain) / int(n) + 0.5 * aux, rtol=1e-5)
    # the router is frozen, but its loss reaches the attention adapters that feed it
    g0, g1 = (jax.grad(lambda p, c=c: token_loss(model, p, v["base"], batch, None, True, router_aux_loss_coef=c)[0])(
        params)["layers"]["self_attn"]["q_proj"]["lora_b"] for c in (0.0, 0.5))  # fmt: skip
    assert float(jnp.abs(g1 - g0).max()) > 1e-6


def test_a_moe_checkpoint_fine_tunes_with_the_router_loss_and_exports(tmp_path):
    """QLoRA on a Qwen3-MoE checkpoint through the entry point with the load-balancing loss: its
    metrics report it; the merged and 4-bit exports load back as Qwen3-MoE and the adapter names
    every expert's linears; the loss on a dense model is refused by its key."""
    from finetune_cli import metrics, run

    from qlora_jax.checkpoints import export_hf
    from qlora_jax.data import ByteTokenizer

    tok = ByteTokenizer()
    cfg = dataclasses.replace(read_config(HF / "qwen3_moe")[0], vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                              eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)  # fmt: skip
    base = LlamaForCausalLM(cfg, dtype=jnp.float32).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["base"]
    export_hf(tmp_path / "moe", cfg, base, dtype=jnp.bfloat16)
    tok.save(tmp_path / "moe")
    run(tmp_path / "run", f"--config.model_path={tmp_path / 'moe'}", "--config.train.steps=3",
        "--config.train.router_aux_loss_coef=0.02", "--config.export.merged=True",
        "--config.export.quantized=True")  # fmt: skip
    rows = [r for r in metrics(tmp_path / "run") if "router_aux_loss" in r]
    assert rows and all(np.isfinite(r["router_aux_loss"]) and r["router_aux_loss"] > 0.5 for r in rows)
    export = tmp_path / "run" / "export"
    for kind in ("merged", "quantized"):
        assert read_config(export / kind)[0] == dataclasses.replace(cfg, head_dim=16), kind
    names = load_file(export / "adapter" / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.1.mlp.experts.3.down_proj.lora_B.weight" in names
    dense = run(tmp_path / "dense", "--config.train.router_aux_loss_coef=0.02", check=False)
    assert dense.returncode != 0 and "config.train.router_aux_loss_coef=0.02: this llama model has no router" in (
        dense.stderr
    )


def test_the_router_loss_under_accumulation_weights_each_micro_batch_by_its_targets():
    """Two micro-batches with 10 and 5 target tokens: the step's gradient is that of
    (Σ_mb CE_sum_mb + c · Σ_mb aux_mb · n_mb) / Σ n_mb, each aux over its own micro-batch's tokens
    (a router loss is not additive over tokens, so accumulation is not one large batch), and the
    metrics report the two terms' target-weighted means."""
    import optax

    from qlora_jax.train import TrainState, make_train_step
    from qlora_jax.train.steps import token_loss

    model, v = load_pretrained(HF / "qwen3_moe", quant=None, lora=LoRAConfig(rank=4, dropout=0.0), dtype=jnp.float32,
                               progress=False)  # fmt: skip
    params = nonzero_adapters(v["params"], scale=0.05)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 128, (2, 2, 8)), jnp.int32)
    attn = np.ones((2, 2, 8), np.int32)
    targets = np.zeros((2, 2, 8), np.int32)
    targets[0, :, 3:] = 1  # 2 rows x 5 targets: 10
    targets[1, 0, 5:] = 1  # 3 targets
    targets[1, 1, 6:] = 1  # 2 targets
    batch = {"input_ids": ids, "attention_mask": jnp.asarray(attn), "loss_mask": jnp.asarray(targets)}
    coef, tx = 0.5, optax.sgd(1.0)
    step = jax.jit(make_train_step(model, tx, router_aux_loss_coef=coef))
    state, m = step(TrainState(jnp.int32(0), params, tx.init(params)), v["base"], batch, jax.random.key(0))

    mbs = [{k: x[i] for k, x in batch.items()} for i in range(2)]
    ns = [int(token_loss(model, params, v["base"], mb, None, True)[1]) for mb in mbs]
    assert ns == [10, 5]

    def aux_of(p, mb):
        _, st = model.apply({**v, "params": p}, mb["input_ids"], mb["attention_mask"], mutable=["intermediates"])
        return moe.load_balancing_loss(st["intermediates"][ROUTER_STATS][0])

    def objective(p):
        ce = sum(token_loss(model, p, v["base"], mb, None, True)[0] for mb in mbs)
        return (ce + coef * sum(aux_of(p, mb) * n for mb, n in zip(mbs, ns, strict=True))) / sum(ns)

    def unweighted(p):  # the other reading: the micro-batches' aux averaged alike
        ce = sum(token_loss(model, p, v["base"], mb, None, True)[0] for mb in mbs)
        return ce / sum(ns) + coef * sum(aux_of(p, mb) for mb in mbs) / 2

    got = traverse_util.flatten_dict(jax.tree.map(lambda new, old: old - new, state.params, params))  # sgd(1)
    for name, fn, close in (("weighted", objective, True), ("unweighted", unweighted, False)):
        errs = [float(jnp.abs(got[path] - g).max() / jnp.abs(g).max())  # of each leaf's largest entry
                for path, g in traverse_util.flatten_dict(jax.jit(jax.grad(fn))(params)).items()]  # fmt: skip
        assert (max(errs) < 1e-5) == close, (name, max(errs))
    auxes = [float(aux_of(params, mb)) for mb in mbs]
    assert abs(auxes[0] - auxes[1]) > 1e-3  # the weighting is visible
    np.testing.assert_allclose(float(m["router_aux_loss"]), (auxes[0] * 10 + auxes[1] * 5) / 15, rtol=1e-5)
    # one large batch would take one aux over all 4 rows' tokens: a different objective
    whole = {k: x.reshape(4, 8) for k, x in batch.items()}
    assert abs(float(aux_of(params, whole)) - float(m["router_aux_loss"])) > 1e-4
