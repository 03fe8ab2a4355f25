"""Checkpoint loading and saving against transformers + bitsandbytes fixtures."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from hf_fixtures import HF, reference
from safetensors.numpy import load_file, save_file

from qlora_jax import quant
from qlora_jax.checkpoints import load_pretrained, read_config, save_pretrained_4bit
from qlora_jax.nn import LoRAConfig, QuantConfig
from qlora_jax.quant import codebooks


def _linears(frozen):
    return {k: v for k, v in traverse_util.flatten_dict(frozen).items() if isinstance(v, quant.QuantizedTensor)}


def test_bnb_checkpoint_loads_byte_exact_and_matches_its_logits():
    d = HF / "llama_bnb4bit"
    model, v = load_pretrained(d, quant=None, dtype=jnp.float32, progress=False)
    stored = load_file(d / "model.safetensors")
    linears = _linears(v["frozen"])
    assert len(linears) == 14
    for path, qt in linears.items():
        name = f"model.layers.{path[0].split('_')[1]}.{path[1]}.{path[2]}.weight"
        np.testing.assert_array_equal(np.asarray(qt.packed), stored[name].reshape(-1))
        np.testing.assert_array_equal(np.asarray(qt.absmax), stored[name + ".absmax"])
        np.testing.assert_array_equal(np.asarray(qt.nested_absmax), stored[name + ".nested_absmax"])
    ref = reference("llama_bnb4bit")
    logits = model.apply(v, ref["input_ids"], ref["attention_mask"], ref["position_ids"])
    real = ref["attention_mask"].astype(bool)
    assert np.abs(np.asarray(logits) - ref["logits"])[real].max() <= 1e-5  # same bytes: float rounding only


def test_quantize_at_load_equals_transformers_bitsandbytes():
    """NF4 + DQ of the fp32 checkpoint: packed codes identical to what transformers + bnb wrote;
    8-bit absmax codes equal up to bnb CPU's lookup-table departures (adjacent codes)."""
    _, ours = load_pretrained(HF / "llama_gqa", quant=QuantConfig("nf4", 64, True), dtype=jnp.float32, progress=False)
    _, plain = load_pretrained(HF / "llama_gqa", quant=QuantConfig("nf4", 64, False), dtype=jnp.float32, progress=False)
    _, theirs = load_pretrained(HF / "llama_bnb4bit", quant=None, dtype=jnp.float32, progress=False)
    a, b, c = _linears(ours["frozen"]), _linears(theirs["frozen"]), _linears(plain["frozen"])
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k].packed), np.asarray(b[k].packed), err_msg=str(k))
        codes, ref = np.asarray(a[k].absmax).astype(int), np.asarray(b[k].absmax).astype(int)
        assert np.all(np.abs(codes - ref) <= 1), k
        # offset: ours is the correctly rounded mean of the block absmax; bnb's (torch's float32
        # sum) is within an ulp of it or else further from the exact mean
        exact = np.mean(np.asarray(c[k].absmax, np.float64))
        off, ref_off = np.float32(a[k].offset), np.float32(b[k].offset)
        assert off == np.float32(exact), k
        assert abs(off - ref_off) <= np.spacing(off) or abs(ref_off - exact) > abs(off - exact), k


def test_quantize_at_load_logits_close_to_bnb():
    ref = reference("llama_bnb4bit")
    model, v = load_pretrained(HF / "llama_gqa", quant=QuantConfig(), dtype=jnp.float32, progress=False)
    logits = np.asarray(model.apply(v, ref["input_ids"], ref["attention_mask"], ref["position_ids"]))
    real = ref["attention_mask"].astype(bool)
    # the same 4-bit codes; only double-quant scales one 8-bit code apart (<= 1.4 % of a block's
    # spread) move the logits, measured 8e-5 here on logits of magnitude ~0.6
    assert np.abs(logits - ref["logits"])[real].max() <= 1e-3


def test_saved_checkpoint_equals_transformers_file_and_loads_back(tmp_path):
    src = HF / "llama_bnb4bit"
    _, v = load_pretrained(src, quant=None, dtype=jnp.float32, progress=False)
    _, raw = read_config(src)
    save_pretrained_4bit(tmp_path, raw, v["frozen"], compute_dtype="float32")
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"] == json.loads((src / "config.json").read_text())["quantization_config"]
    _, back = load_pretrained(tmp_path, quant=None, dtype=jnp.float32, progress=False)
    for x, y in zip(jax.tree.leaves(v["frozen"]), jax.tree.leaves(back["frozen"]), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_of_our_own_quantization_round_trips(tmp_path):
    _, v = load_pretrained(HF / "qwen2", quant=QuantConfig("fp4", 64, False), progress=False)
    _, raw = read_config(HF / "qwen2")
    save_pretrained_4bit(tmp_path, raw, v["frozen"])
    model, back = load_pretrained(tmp_path, quant=None, progress=False)
    assert model.quant == QuantConfig("fp4", 64, False)
    for x, y in zip(jax.tree.leaves(v["frozen"]), jax.tree.leaves(back["frozen"]), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_adapters_are_initialised_like_peft():
    model, v = load_pretrained(HF / "llama_gqa", lora=LoRAConfig(rank=4), seed=3, progress=False)
    assert model.lora.rank == 4
    a = v["params"]["layers_0"]["mlp"]["down_proj"]["lora_a"]
    assert a.shape == (4, 128) and float(jnp.abs(a).max()) <= 1 / np.sqrt(128)
    np.testing.assert_array_equal(np.asarray(v["params"]["layers_1"]["self_attn"]["q_proj"]["lora_b"]), 0.0)
    _, again = load_pretrained(HF / "llama_gqa", lora=LoRAConfig(rank=4), seed=3, progress=False)
    jax.tree.map(np.testing.assert_array_equal, v["params"], again["params"])


def _copy(tmp_path, name="qwen2"):
    dst = tmp_path / name
    shutil.copytree(HF / name, dst)
    return dst


def test_errors_name_the_path_key_or_tensor(tmp_path):
    with pytest.raises(ValueError, match="not a Hugging Face checkpoint directory"):
        load_pretrained(tmp_path / "nope")
    d = _copy(tmp_path)
    tensors = load_file(d / "model.safetensors")

    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_file(missing, str(d / "model.safetensors"))
    with pytest.raises(
        ValueError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight' \(expected shape \[128, 64\]\)"
    ):
        load_pretrained(d, progress=False)

    save_file({**tensors, "model.layers.0.extra.weight": np.zeros(3, np.float32)}, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"tensors this model does not use: \['model.layers.0.extra.weight'\]"):
        load_pretrained(d, progress=False)

    bad = dict(tensors)
    bad["model.layers.0.self_attn.q_proj.weight"] = np.zeros((64, 32), np.float32)
    save_file(bad, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj.weight' has shape \[64, 32\]"):
        load_pretrained(d, progress=False)

    (d / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no model\.safetensors"):
        load_pretrained(d, progress=False)

    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "falcon"}))
    with pytest.raises(ValueError, match=r"config\.json: model_type 'falcon' is not supported"):
        load_pretrained(d, progress=False)


def test_prequantized_checkpoint_rejects_a_different_quant_config():
    with pytest.raises(ValueError, match="loads as stored"):
        load_pretrained(HF / "llama_bnb4bit", quant=QuantConfig("fp4", 64, True), progress=False)


def test_fixture_quant_maps_are_canonical():
    stored = load_file(HF / "llama_bnb4bit" / "model.safetensors")
    np.testing.assert_array_equal(stored["model.layers.0.mlp.up_proj.weight.quant_map"], codebooks.NF4)
