"""The merge lab (``qlora_jax.nn.merge.merge_adapters``): the bf16 route and re-quantizing to NF4,
checked against float64 merges and the unmerged model."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from hf_fixtures import HF, nonzero_adapters

from qlora_jax import quant
from qlora_jax.checkpoints import load_peft_adapter, load_pretrained
from qlora_jax.nn import LoRAConfig, QuantConfig
from qlora_jax.nn.llama import unstack_experts, unstack_layers
from qlora_jax.nn.merge import merge_adapters

PEFT = HF.parent / "peft"


def _logits(model, v, ref):
    return np.asarray(model.apply(v, ref["input_ids"], ref["attention_mask"], ref["position_ids"]))


def _flat(tree):
    return traverse_util.flatten_dict(unstack_experts(unstack_layers(tree)))


@pytest.mark.parametrize("name", ["qwen3", "mixtral"])
def test_the_bf16_merge_computes_the_adapted_model(name):
    """NF4 base, adapters on every linear (experts' too): the merged bf16 model's logits equal the
    unmerged model's to bf16 rounding of the weights, every kernel is a bf16 array, and each
    tensor's reported error is bf16's (below 2^-8 of the merge)."""
    cfg_lora = LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=_targets(name))
    model, v = load_pretrained(HF / name, lora=cfg_lora, dtype=jnp.float32, progress=False)
    v = {**v, "params": nonzero_adapters(v["params"], scale=0.1)}
    merged_model, merged, report = merge_adapters(model, v)
    assert merged_model.lora is None
    kernels = [x for p, x in _flat(merged["base"]).items() if p[-1] == "kernel" and p[0] != "lm_head"]
    assert kernels and all(not quant.is_quantized(x) and x.dtype == jnp.bfloat16 for x in kernels)
    assert len(report) == sum(1 for p in _flat(v["params"]) if p[-1] == "lora_a")
    assert max(r["rel_fro_err"] for r in report.values()) < 2**-8
    ref = dict(np.load(HF / name / "reference.npz"))
    real = ref["attention_mask"].astype(bool)
    want, got = _logits(model, v, ref), _logits(merged_model, merged, ref)
    base = _logits(model.clone(lora=None), {"base": v["base"]}, ref)
    scale = np.abs(want[real]).max()
    assert np.abs(got - want)[real].max() <= 2e-2 * scale
    assert np.abs(base - want)[real].max() > 10 * np.abs(got - want)[real].max()  # the adapters are merged


def _targets(name):
    from qlora_jax.checkpoints import read_config

    return read_config(HF / name)[0].linear_names


def test_requantizing_reports_what_it_loses_against_a_float64_merge():
    """NF4 again: each adapted tensor's stored bytes are our quantizer's of the float32 merge, its
    reported errors equal float64 ones computed here, the unadapted tensors keep their bytes, and
    the small update is mostly lost (rel_update_err near or above 1 for B ~ N(0, 0.01²))."""
    lora = LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj"))
    model, v = load_pretrained(HF / "qwen3", lora=lora, dtype=jnp.float32, progress=False, scan_layers=False)
    v = {**v, "params": nonzero_adapters(v["params"], scale=0.01)}
    _, merged, report = merge_adapters(model, v, requantize=QuantConfig())
    base, params, out = _flat(v["base"]), _flat(v["params"]), _flat(merged["base"])
    name = "model.layers.1.self_attn.q_proj.weight"
    path = ("layers_1", "self_attn", "q_proj", "kernel")
    w = np.asarray(quant.dequantize(base[path], jnp.float32), np.float64)
    a, b = (np.asarray(params[(*path[:-1], k)], np.float64) for k in ("lora_a", "lora_b"))
    merge64 = w + lora.scale * b @ a
    stored = np.asarray(quant.dequantize(out[path], jnp.float32), np.float64)
    err = stored - merge64
    r = report[name]
    assert r["max_abs_err"] == pytest.approx(np.abs(err).max(), rel=1e-4)
    assert r["rel_fro_err"] == pytest.approx(np.linalg.norm(err) / np.linalg.norm(merge64), rel=1e-4)
    assert r["rel_update_err"] == pytest.approx(np.linalg.norm(err) / np.linalg.norm(merge64 - w), rel=1e-4)
    assert r["rel_update_err"] > 0.5
    np.testing.assert_array_equal(out[path].packed, QuantConfig().quantize(jnp.asarray(merge64, jnp.float32)).packed)
    kept = ("layers_1", "mlp", "down_proj", "kernel")
    np.testing.assert_array_equal(out[kept].packed, base[kept].packed)
    assert set(report) == {f"model.layers.{i}.self_attn.{m}.weight" for i in (0, 1) for m in ("q_proj", "v_proj")}


def test_a_dora_adapter_merges_with_its_magnitudes():
    model, v = load_peft_adapter(*load_pretrained(HF / "qwen3", quant=None, lora=None, dtype=jnp.float32,
                                                  progress=False), PEFT / "qwen3_dora_r4")  # fmt: skip
    merged_model, merged, _ = merge_adapters(model, v)
    ref = dict(np.load(PEFT / "qwen3_dora_r4" / "reference.npz"))
    real = ref["attention_mask"].astype(bool)
    got = _logits(merged_model, merged, ref)
    assert np.abs(got - ref["logits"])[real].max() <= 2e-2 * np.abs(ref["logits"][real]).max()
    assert np.abs(ref["base_logits"] - ref["logits"])[real].max() > 0.1 * np.abs(ref["logits"][real]).max()


def test_a_model_without_adapters_is_refused():
    model, v = load_pretrained(HF / "qwen3", lora=None, progress=False)
    with pytest.raises(ValueError, match="has no adapters"):
        merge_adapters(model, v)
