"""PEFT adapters in (``load_peft_adapter``), DoRA, and ``config.init_adapter``.

The adapters are PEFT 0.21's own (tests/fixtures/make_peft_in_fixtures.py, make_peft_fixture.py,
make_moe_peft_fixture.py), with random non-zero B (DoRA: magnitudes moved off their initial
norms) so that each moves the logits far past the tolerance; their references are PEFT's float32
logits and, for DoRA, PEFT's gradients.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from hf_fixtures import HF, byte_checkpoint
from safetensors.numpy import load_file, save_file

from qlora_jax.checkpoints import export_peft_adapter, load_peft_adapter, load_pretrained
from qlora_jax.checkpoints.peft import peft_tensor_name
from qlora_jax.nn import LoRAConfig, QuantConfig
from qlora_jax.nn.llama import unstack_layers
from qlora_jax.nn.lora import dense_weight

PEFT = HF.parent / "peft"
ADAPTERS = {  # adapter: (base fixture, rank, rsLoRA, DoRA)
    "llama_gqa_rslora_r8": ("llama_gqa", 8, True, False),
    "qwen3_dora_r4": ("qwen3", 4, False, True),
    "mistral_dora_r4": ("mistral", 4, True, True),
    "phi3_r4": ("phi3", 4, False, False),
    "mixtral_r4": ("mixtral", 4, False, False),
    "qwen3_moe_r4": ("qwen3_moe", 4, False, False),
}


def _base(name, **kw):
    return load_pretrained(HF / name, quant=None, lora=None, dtype=jnp.float32, progress=False, **kw)


def _logits(model, v, ref):
    return np.asarray(model.apply(v, ref["input_ids"], ref["attention_mask"], ref["position_ids"]))


def _copy(tmp_path, adapter="llama_gqa_rslora_r8"):
    dst = tmp_path / adapter
    shutil.copytree(PEFT / adapter, dst)
    return dst


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_a_peft_adapter_gives_pefts_logits(adapter, scan):
    """fp32 logits within 1e-4 of the largest (measured 2e-7 to 4e-6), where the adapter moves
    them by 0.5 to 1.6 of it; the returned model carries the adapter's settings."""
    base, rank, rslora, dora = ADAPTERS[adapter]
    model, v = load_peft_adapter(*_base(base, scan_layers=scan), PEFT / adapter)
    assert (model.lora.rank, model.lora.use_rslora, model.lora.use_dora) == (rank, rslora, dora)
    ref = dict(np.load(PEFT / adapter / "reference.npz"))
    real = ref["attention_mask"].astype(bool)
    scale = np.abs(ref["logits"][real]).max()
    assert np.abs(_logits(model, v, ref) - ref["logits"])[real].max() <= 1e-4 * scale
    assert np.abs(ref["base_logits"] - ref["logits"])[real].max() > 0.1 * scale  # the adapter matters


@pytest.mark.parametrize("adapter", ["qwen3_dora_r4", "mistral_dora_r4"])
def test_dora_gradients_are_pefts_with_the_norm_detached(adapter):
    """d mean(logits²) / d (A, B, m) for every adapter tensor equal PEFT's (the weight norm is a
    constant to autograd there): within 1e-4 of each tensor's largest; measured below 2e-5."""
    model, v = load_peft_adapter(*_base(ADAPTERS[adapter][0], scan_layers=False), PEFT / adapter)
    ref = dict(np.load(PEFT / adapter / "reference.npz"))
    real = ref["attention_mask"].astype(bool)

    def loss(params):
        logits = model.apply({**v, "params": params}, ref["input_ids"], ref["attention_mask"], ref["position_ids"])
        return jnp.mean(logits[real] ** 2)

    grads = traverse_util.flatten_dict(jax.jit(jax.grad(loss))(v["params"]))
    for path, g in grads.items():
        name = peft_tensor_name(path)
        want = ref["grad/" + name + (".weight" if name.endswith("lora_magnitude_vector") else "")]
        err = float(np.abs(np.asarray(g) - want).max() / np.abs(want).max())
        assert err <= 1e-4, (name, err)
    assert len(grads) == len([k for k in ref if k.startswith("grad/")])


def test_dora_on_a_4bit_base_is_dora_on_its_dequantized_weights():
    """The norm and the rescaled base term use the 4-bit weight as it dequantizes: the same as a
    16-bit model holding those dequantized weights (checked against PEFT above)."""
    q_model, qv = load_pretrained(HF / "qwen3", quant=QuantConfig(), lora=None, dtype=jnp.float32, progress=False)
    q_model, qv = load_peft_adapter(q_model, qv, PEFT / "qwen3_dora_r4")
    model, v = load_peft_adapter(*_base("qwen3"), PEFT / "qwen3_dora_r4")
    dense = jax.tree.map(lambda x: dense_weight(x) if hasattr(x, "packed") else x, qv["base"],
                         is_leaf=lambda x: hasattr(x, "packed"))  # fmt: skip
    ref = dict(np.load(PEFT / "qwen3_dora_r4" / "reference.npz"))
    real = ref["attention_mask"].astype(bool)
    got, want = _logits(q_model, qv, ref), _logits(model, {**v, "base": dense}, ref)
    assert np.abs(got - want)[real].max() <= 1e-5 * np.abs(want[real]).max()
    assert np.abs(got - ref["logits"])[real].max() > 1e-3 * np.abs(want[real]).max()  # NF4 is not the fp32 base


def test_a_fresh_dora_adapter_is_a_no_op_and_starts_at_the_weight_norms():
    lora = LoRAConfig(rank=4, dropout=0.0, use_dora=True)
    model, v = load_pretrained(HF / "qwen3", quant=None, lora=lora, dtype=jnp.float32, progress=False,
                               scan_layers=False)  # fmt: skip
    plain, pv = _base("qwen3", scan_layers=False)
    ref = dict(np.load(HF / "qwen3" / "reference.npz"))
    np.testing.assert_allclose(_logits(model, v, ref), _logits(plain, pv, ref), rtol=1e-5, atol=1e-5)
    w = np.asarray(v["base"]["layers_1"]["mlp"]["down_proj"]["kernel"], np.float64)
    np.testing.assert_allclose(v["params"]["layers_1"]["mlp"]["down_proj"]["lora_magnitude"],
                               np.sqrt((w**2).sum(1)), rtol=1e-6)  # fmt: skip


def test_our_dora_export_is_pefts_file(tmp_path):
    """PEFT's DoRA adapter read and written back: the same tensors, values and settings."""
    model, v = load_peft_adapter(*_base("mistral"), PEFT / "mistral_dora_r4")
    export_peft_adapter(tmp_path, v["params"], model.lora, None)
    ours, theirs = (
        load_file(tmp_path / "adapter_model.safetensors"),
        load_file(PEFT / "mistral_dora_r4" / "adapter_model.safetensors"),
    )
    assert ours.keys() == theirs.keys()
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    mine = json.loads((tmp_path / "adapter_config.json").read_text())
    peft_cfg = json.loads((PEFT / "mistral_dora_r4" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "use_rslora", "use_dora", "bias"):
        assert mine[key] == peft_cfg[key], key
    assert sorted(mine["target_modules"]) == sorted(peft_cfg["target_modules"])


def test_a_dora_merge_equals_the_adapted_model():
    """merged export: W' = m / ||W + sBA|| · (W + sBA), the adapted model's function."""
    from qlora_jax.checkpoints.hf import hf_tensors

    model, v = load_peft_adapter(*_base("qwen3"), PEFT / "qwen3_dora_r4")
    tensors = hf_tensors(v["base"], jnp.float32, v["params"], model.lora)
    flat = traverse_util.flatten_dict(unstack_layers(v["params"]))
    a, b, m = (np.asarray(flat[("layers_0", "self_attn", "q_proj", k)], np.float64)
               for k in ("lora_a", "lora_b", "lora_magnitude"))  # fmt: skip
    w = np.asarray(unstack_layers(v["base"])["layers_0"]["self_attn"]["q_proj"]["kernel"], np.float64)
    merged = w + model.lora.scale * b @ a
    merged *= (m / np.linalg.norm(merged, axis=1))[:, None]
    got = tensors["model.layers.0.self_attn.q_proj.weight"]
    assert np.abs(got - merged).max() <= 2**-8 * np.abs(merged).max()  # the merge is rounded to bf16
    assert np.abs(w - merged).max() > 0.05 * np.abs(merged).max()


def _edit_config(d, **changes):
    path = d / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "changes,named",
    [
        (dict(rank_pattern={"q_proj": 16}), "rank_pattern={'q_proj': 16}"),
        (dict(alpha_pattern={"v_proj": 4}), "alpha_pattern"),
        (dict(bias="lora_only"), "bias='lora_only'"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save=['lm_head']"),
        (dict(layers_to_transform=[0]), "layers_to_transform=[0]"),
        (dict(target_parameters=["mlp.experts.gate_up_proj"]), "target_parameters"),
        (dict(init_lora_weights="pissa_niter_4"), "init_lora_weights='pissa_niter_4'"),
        (dict(init_lora_weights="olora"), "OLoRA's residual base"),
        (dict(init_lora_weights="loftq"), "LoftQ's base"),
        (dict(peft_type="IA3"), "only LORA adapters"),
        (dict(init_lora_weights="OLoRA"), "OLoRA's residual base"),  # PEFT reads it case-insensitively
        (dict(init_lora_weights="lora_ga"), "LoRA-GA's residual base"),
        (dict(init_lora_weights="mica"), "MiCA trains B alone"),
        (dict(rank_pattern={"q_proj": 8, "v_proj": 4}), "rank_pattern"),
        (dict(r=None), "r=None, lora_alpha=16"),
        (dict(some_future_field=3), "some_future_field=3"),
    ],
)
def test_settings_we_cannot_express_are_refused_by_name(tmp_path, changes, named):
    d = _copy(tmp_path)
    _edit_config(d, **changes)
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("(", r"\(")) as e:
        load_peft_adapter(*_base("llama_gqa"), d)
    assert str(d) in str(e.value)


@pytest.mark.parametrize(
    "changes",
    [
        dict(target_modules=r".*\.(q_proj|v_proj|down_proj)"),  # a regex: the tensors say which
        dict(target_modules=["self_attn.q_proj", "self_attn.v_proj", "down_proj", "o_proj"]),  # o_proj: none
        dict(exclude_modules=["lm_head"], layers_pattern="layers", ensure_weight_tying=True, bias=None),
        dict(rank_pattern={"q_proj": 8}, alpha_pattern={"v_proj": 16}),  # the adapter's own r and alpha
        dict(corda_config={"corda_method": "ipm"}, eva_config={"rho": 2.0}),  # converted / data-driven A
    ],
    ids=["regex", "suffixes", "descriptive", "patterns", "made-by"],
)
def test_settings_that_change_nothing_are_read(tmp_path, changes):
    d = _copy(tmp_path)
    _edit_config(d, **changes)
    model, v = load_peft_adapter(*_base("llama_gqa"), d)
    assert model.lora.targets == ("down_proj", "q_proj", "v_proj") and model.lora.rank == 8
    ref = dict(np.load(PEFT / "llama_gqa_rslora_r8" / "reference.npz"))
    real = ref["attention_mask"].astype(bool)
    assert np.abs(_logits(model, v, ref) - ref["logits"])[real].max() <= 1e-4 * np.abs(ref["logits"][real]).max()


def test_a_dora_magnitude_stays_float32_with_bf16_adapters():
    """m ~ ||W_row|| ~ 1 moves by ~lr a step, below a bf16 ulp there: kept in float32."""
    lora = LoRAConfig(rank=4, dropout=0.0, use_dora=True, dtype=jnp.bfloat16)
    _, v = load_pretrained(HF / "qwen3", quant=QuantConfig(), lora=lora, progress=False)
    leaves = traverse_util.flatten_dict(v["params"])
    assert {x.dtype for p, x in leaves.items() if p[-1] == "lora_magnitude"} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for p, x in leaves.items() if p[-1] != "lora_magnitude"} == {jnp.dtype(jnp.bfloat16)}


def _edit_tensors(d, fn):
    path = d / "adapter_model.safetensors"
    tensors = fn(load_file(path))
    save_file(tensors, path, metadata={"format": "pt"})


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "edit,named",
    [
        (lambda t: {k: x for k, x in t.items() if k != f"{Q0}.lora_B.weight"}, f"missing ['{Q0}.lora_B.weight']"),
        (lambda t: {**t, "base_model.model.lm_head.lora_A.weight": np.zeros((8, 64), np.float32)},
         "'base_model.model.lm_head.lora_A.weight' is not a decoder linear's"),
        (lambda t: {**t, f"{Q0}.lora_A.weight": np.zeros((4, 64), np.float32)},
         f"'{Q0}.lora_A.weight' has shape [4, 64]; the model needs [8, 64]"),
        (lambda t: {**t, f"{Q0}.lora_B.weight": np.full_like(t[f"{Q0}.lora_B.weight"], np.nan)},
         f"'{Q0}.lora_B.weight' has 512 non-finite values"),
        (lambda t: {**t, "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": t[f"{Q0}.lora_A.weight"]},
         "not in this model"),
    ],
    ids=["missing", "lm_head", "shape", "nan", "extra-layer"],
)  # fmt: skip
def test_a_tensor_we_cannot_place_is_refused_by_name(tmp_path, edit, named):
    d = _copy(tmp_path)
    _edit_tensors(d, edit)
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
        load_peft_adapter(*_base("llama_gqa"), d)


def test_an_adapter_for_linears_the_model_does_not_have_is_refused():
    with pytest.raises(ValueError, match=r"adapters on \['q_proj', 'v_proj'\], which are not linears of this phi3"):
        load_peft_adapter(*_base("phi3"), PEFT / "llama_gqa_rslora_r8")  # Phi-3's are fused


def test_dora_on_moe_experts_is_refused():
    lora = LoRAConfig(rank=4, use_dora=True, targets=("q_proj", "gate_proj"))
    with pytest.raises(ValueError, match=r"DoRA .*not implemented for MoE experts"):
        load_pretrained(HF / "qwen3_moe", quant=None, lora=lora, dtype=jnp.float32, progress=False)


@pytest.mark.slow
def test_a_fine_tune_starts_from_a_peft_adapter(tmp_path):
    """``--config.init_adapter``: the run takes the adapter's r, alpha, targets and rsLoRA (its
    config records them; dropout stays the run's) and trains from its tensors: with a learning
    rate of 1e-12 one step later the exported adapter is PEFT's file to float32 rounding, and a
    path that is not an adapter is refused by its key."""

    from finetune_cli import run

    ckpt = byte_checkpoint(tmp_path, "llama_gqa")
    adapter = PEFT / "llama_gqa_rslora_r8"
    run(tmp_path / "run", f"--config.model_path={ckpt}", f"--config.init_adapter={adapter}",
        "--config.train.steps=1", "--config.train.learning_rate=1e-12", "--config.lora.dropout=0.0",
        "--config.train.dtype=float32")  # fmt: skip
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())["lora"]
    assert (saved["rank"], saved["alpha"], saved["use_rslora"], saved["dropout"]) == (8, 16.0, True, 0.0)
    assert sorted(saved["targets"]) == ["down_proj", "q_proj", "v_proj"]
    out = tmp_path / "run" / "export" / "adapter"
    ours, theirs = load_file(out / "adapter_model.safetensors"), load_file(adapter / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for k in theirs:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-6, atol=1e-9, err_msg=k)
    written = json.loads((out / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["use_rslora"]) == (8, 16.0, True)
    bad = run(tmp_path / "bad", f"--config.init_adapter={ckpt}", check=False)
    assert bad.returncode != 0 and "config.init_adapter" in bad.stderr and "no PEFT adapter directory" in bad.stderr


def test_dora_with_dropout_rescales_the_dropped_input_as_peft_does():
    """In training with dropout, PEFT's DoRA computes x W^T + (g - 1) drop(x) W^T + g s drop(x) A^T B^T
    + b (DoraLinearLayer with base_result=None): checked with the very mask the layer drew (its
    Dropout's output, captured), against a float64 evaluation; the eval path is g (x W^T + s x A^T B^T) + b."""
    import flax.linen as nn

    from qlora_jax.nn import LoRADense

    layer = LoRADense(48, lora=LoRAConfig(rank=4, alpha=8, dropout=0.3, use_dora=True), use_bias=True,
                      dtype=jnp.float32)  # fmt: skip
    x = jax.random.normal(jax.random.key(0), (5, 32))
    v = layer.init(jax.random.key(1), x)
    rng = np.random.default_rng(0)
    p = jax.tree.map(lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(np.float32), v["params"])
    base = {"kernel": v["base"]["kernel"], "bias": jnp.asarray(rng.standard_normal(48), jnp.float32)}
    dropout_out = lambda mdl, _: isinstance(mdl, nn.Dropout)  # noqa: E731
    y, state = layer.apply({"params": p, "base": base}, x, deterministic=False, rngs={"dropout": jax.random.key(2)},
                           capture_intermediates=dropout_out, mutable=["intermediates"])  # fmt: skip
    h = np.asarray(jax.tree.leaves(state["intermediates"])[0], np.float64)
    assert (h == 0).any() and not np.allclose(h, np.asarray(x))  # the mask dropped something
    w, bias = np.asarray(base["kernel"], np.float64), np.asarray(base["bias"], np.float64)
    a, b, m = (np.asarray(p[k], np.float64) for k in ("lora_a", "lora_b", "lora_magnitude"))
    s = 8 / 4
    g = m / np.linalg.norm(w + s * b @ a, axis=1)
    x64 = np.asarray(x, np.float64)
    want = x64 @ w.T + (g - 1) * (h @ w.T) + g * s * (h @ a.T @ b.T) + bias
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    y_eval = layer.apply({"params": p, "base": base}, x)
    np.testing.assert_allclose(np.asarray(y_eval), g * (x64 @ w.T + s * x64 @ a.T @ b.T) + bias, rtol=1e-5, atol=1e-5)
