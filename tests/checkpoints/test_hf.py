"""Checkpoint loading and saving against transformers + bitsandbytes fixtures."""

import json
import re
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
from qlora_jax.nn import LlamaConfig, LoRAConfig, QuantConfig
from qlora_jax.nn.llama import unstack_layers
from qlora_jax.quant import codebooks


def _linears(frozen):
    """Per-layer QuantizedTensors (the scanned layout unstacked), by path."""
    flat = traverse_util.flatten_dict(unstack_layers(frozen))
    return {k: v for k, v in flat.items() if isinstance(v, quant.QuantizedTensor)}


BNB_FIXTURES = ["llama_bnb4bit", "qwen3_bnb4bit", "gemma3_text_bnb4bit", "phi3_bnb4bit"]


@pytest.mark.parametrize("name", BNB_FIXTURES)
def test_bnb_checkpoint_loads_byte_exact_and_matches_its_logits(name):
    d = HF / name
    model, v = load_pretrained(d, quant=None, dtype=jnp.float32, progress=False)
    stored = load_file(d / "model.safetensors")
    linears = _linears(v["base"])
    assert len(linears) == 2 * len(model.config.linear_names)  # Phi-3: 4 a layer (qkv and gate/up fused)
    for path, qt in linears.items():
        key = f"model.layers.{path[0].split('_')[1]}.{path[1]}.{path[2]}.weight"
        np.testing.assert_array_equal(np.asarray(qt.packed), stored[key].reshape(-1))
        np.testing.assert_array_equal(np.asarray(qt.absmax), stored[key + ".absmax"])
        np.testing.assert_array_equal(np.asarray(qt.nested_absmax), stored[key + ".nested_absmax"])
    ref = reference(name)
    logits = model.apply(v, ref["input_ids"], ref["attention_mask"], ref["position_ids"])
    real = ref["attention_mask"].astype(bool)
    assert np.abs(np.asarray(logits) - ref["logits"])[real].max() <= 1e-5  # same bytes: float rounding only


def test_quantize_at_load_equals_transformers_bitsandbytes():
    """NF4 + DQ of the fp32 checkpoint: packed codes identical to what transformers + bnb wrote;
    8-bit absmax codes equal up to bnb CPU's lookup-table departures (adjacent codes)."""
    _, ours = load_pretrained(HF / "llama_gqa", quant=QuantConfig("nf4", 64, True), dtype=jnp.float32, progress=False)
    _, plain = load_pretrained(HF / "llama_gqa", quant=QuantConfig("nf4", 64, False), dtype=jnp.float32, progress=False)
    _, theirs = load_pretrained(HF / "llama_bnb4bit", quant=None, dtype=jnp.float32, progress=False)
    a, b, c = _linears(ours["base"]), _linears(theirs["base"]), _linears(plain["base"])
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


@pytest.mark.parametrize("name", BNB_FIXTURES)
def test_saved_checkpoint_equals_transformers_file_and_loads_back(tmp_path, name):
    src = HF / name
    _, v = load_pretrained(src, quant=None, dtype=jnp.float32, progress=False)
    _, raw = read_config(src)
    save_pretrained_4bit(tmp_path, raw, v["base"], compute_dtype="float32")
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"] == json.loads((src / "config.json").read_text())["quantization_config"]
    _, back = load_pretrained(tmp_path, quant=None, dtype=jnp.float32, progress=False)
    for x, y in zip(jax.tree.leaves(v["base"]), jax.tree.leaves(back["base"]), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_of_our_own_quantization_round_trips(tmp_path):
    _, v = load_pretrained(HF / "qwen2", quant=QuantConfig("fp4", 64, False), progress=False)
    _, raw = read_config(HF / "qwen2")
    save_pretrained_4bit(tmp_path, raw, v["base"])
    model, back = load_pretrained(tmp_path, quant=None, progress=False)
    assert model.quant == QuantConfig("fp4", 64, False)
    for x, y in zip(jax.tree.leaves(v["base"]), jax.tree.leaves(back["base"]), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_adapters_are_initialised_like_peft():
    model, v = load_pretrained(HF / "llama_gqa", lora=LoRAConfig(rank=4), seed=3, progress=False)
    assert model.lora.rank == 4
    params = unstack_layers(v["params"])
    a = params["layers_0"]["mlp"]["down_proj"]["lora_a"]
    assert a.shape == (4, 128) and float(jnp.abs(a).max()) <= 1 / np.sqrt(128)
    assert not np.array_equal(a, params["layers_1"]["mlp"]["down_proj"]["lora_a"])  # each layer its own draw
    np.testing.assert_array_equal(np.asarray(params["layers_1"]["self_attn"]["q_proj"]["lora_b"]), 0.0)
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


# --- Faults in the checkpoint: non-finite values, badly quantizing tensors ----------------------


@pytest.mark.parametrize(
    "name, bad, quantized",
    [
        ("model.layers.1.mlp.up_proj.weight", np.nan, True),  # quantized at load
        ("model.layers.0.self_attn.q_proj.weight", np.inf, True),
        ("model.embed_tokens.weight", -np.inf, False),  # kept in 16 bits
        ("model.norm.weight", np.nan, False),
    ],
)
def test_nonfinite_tensor_is_refused_naming_tensor_file_and_count(tmp_path, name, bad, quantized):
    d = _copy(tmp_path)
    tensors = load_file(d / "model.safetensors")
    t = tensors[name].copy()
    t.reshape(-1)[[3, 7]] = bad
    save_file({**tensors, name: t}, str(d / "model.safetensors"))
    kind = {"nan": "NaN: 2", "inf": r"\+Inf: 2", "-inf": "-Inf: 2"}[str(bad)]
    match = rf"{d / 'model.safetensors'}: tensor '{name}' has 2 non-finite values of {t.size} \(.*{kind}"
    with pytest.raises(ValueError, match=match):
        load_pretrained(d, quant=QuantConfig() if quantized else None, progress=False)
    _, v = load_pretrained(d, quant=QuantConfig() if quantized else None, check_finite=False, progress=False)  # opt-out
    assert v["base"]


def test_float16_overflow_at_load_is_refused(tmp_path):
    """A float32 value beyond float16's range turns into Inf when cast: checked after the cast."""
    d = _copy(tmp_path)
    tensors = load_file(d / "model.safetensors")
    t = tensors["model.layers.0.input_layernorm.weight"].copy()
    t[0] = 1e6
    save_file({**tensors, "model.layers.0.input_layernorm.weight": t}, str(d / "model.safetensors"))
    load_pretrained(d, quant=None, dtype=jnp.float32, progress=False)  # finite in float32
    with pytest.raises(ValueError, match=r"input_layernorm.weight' has 1 non-finite values .*\+Inf: 1"):
        load_pretrained(d, quant=None, dtype=jnp.float16, progress=False)


def _restore_bnb(d, double_quant: bool | None = None, dtype: str | None = None, only: str | None = None):
    """Rewrite the bitsandbytes checkpoint ``d``'s 4-bit weights (those under ``only``, or all):
    requantized with(out) double quantization, or with another recorded source ``dtype``; the
    config's quantization_config follows when every weight is rewritten."""
    tensors = load_file(d / "model.safetensors")
    names = [k.split(".quant_state.")[0] for k in tensors if ".quant_state." in k]
    for name in names if only is None else [only]:
        qt = quant.from_bnb_state_dict(tensors, prefix=name)
        if double_quant is not None:
            qt = quant.quantize(quant.dequantize(qt, jnp.float32), qt.quant_type, qt.block_size, double_quant)
        if dtype is not None:
            qt = qt.replace(dtype=dtype)
        for k in [k for k in tensors if k.startswith(name + ".")]:
            del tensors[k]
        tensors.update(quant.to_bnb_state_dict(qt, prefix=name))
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    if only is None and double_quant is not None:
        raw = json.loads((d / "config.json").read_text())
        raw["quantization_config"]["bnb_4bit_use_double_quant"] = double_quant
        (d / "config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("field", ["nested_absmax", "absmax"])
def test_bnb_checkpoint_with_nonfinite_block_constants_is_refused(tmp_path, field):
    d = _copy(tmp_path, "llama_bnb4bit")
    if field == "absmax":  # without double quantization the absmax is float32
        _restore_bnb(d, double_quant=False)
    key = "model.layers.1.self_attn.v_proj.weight"
    tensors = load_file(d / "model.safetensors")
    a = tensors[f"{key}.{field}"].copy()
    assert a.dtype == np.float32
    a[0] = np.nan
    tensors[f"{key}.{field}"] = a
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"tensor '{key}.{field}' has 1 non-finite values"):
        load_pretrained(d, quant=None, progress=False)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_a_bnb_weight_stored_unlike_its_config_is_named(tmp_path, scan_layers):
    d = _copy(tmp_path, "llama_bnb4bit")
    key = "model.layers.1.mlp.up_proj.weight"
    _restore_bnb(d, double_quant=False, only=key)  # the config still says double quant
    with pytest.raises(
        ValueError, match=rf"'{key}' is stored as nf4 blocks of 64, no double quant but config.json's .* implies "
        r"nf4 blocks of 64, double quant 256"
    ):  # fmt: skip
        load_pretrained(d, quant=None, progress=False, scan_layers=scan_layers)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_a_bnb_checkpoint_quantized_from_bfloat16_loads_its_bytes(tmp_path, scan_layers):
    """bitsandbytes records the dtype a weight was quantized from; a model saved from bf16 (most on
    the Hub) says "bfloat16". The base records it too, and keeps every stored byte."""
    d = _copy(tmp_path, "llama_bnb4bit")
    _restore_bnb(d, dtype="bfloat16")
    model, v = load_pretrained(d, quant=None, dtype=jnp.float32, progress=False, scan_layers=scan_layers)
    assert model.quant.weight_dtype == "bfloat16"
    _, f32 = load_pretrained(HF / "llama_bnb4bit", quant=None, dtype=jnp.float32, progress=False, scan_layers=False)
    got = traverse_util.flatten_dict(unstack_layers(v["base"]) if scan_layers else v["base"])
    want = traverse_util.flatten_dict(f32["base"])
    assert got.keys() == want.keys()
    for k, qt in got.items():
        if quant.is_quantized(qt):
            assert qt.dtype == "bfloat16", k
            for field in ("packed", "absmax", "nested_absmax", "offset"):
                np.testing.assert_array_equal(getattr(qt, field), getattr(want[k], field), err_msg=str(k))


def test_a_bfloat16_checkpoint_quantizes_at_load(tmp_path):
    """The base of a bf16 checkpoint records bfloat16; its codes are those of the float32 values."""
    d = _copy(tmp_path, "qwen2")
    tensors = load_file(d / "model.safetensors")
    bf16 = {k: v.astype(jnp.bfloat16) for k, v in tensors.items()}
    save_file(bf16, str(d / "model.safetensors"), metadata={"format": "pt"})
    model, v = load_pretrained(d, dtype=jnp.float32, progress=False, report_quant_error=False)
    assert model.quant.weight_dtype == "bfloat16"
    qt = unstack_layers(v["base"])["layers_0"]["self_attn"]["q_proj"]["kernel"]
    want = quant.quantize(bf16["model.layers.0.self_attn.q_proj.weight"].astype(np.float32))
    assert qt.dtype == "bfloat16"
    np.testing.assert_array_equal(qt.packed, want.packed)
    np.testing.assert_array_equal(qt.absmax, want.absmax)


def _with_outlier(tmp_path, factor=1000.0):
    """llama_gqa with one element of layer 0's q_proj ([64, 64]: 64 blocks, one nested block) set to
    ``factor`` times the mean block absmax: double quantization's mean offset and 8-bit scale then
    turn the other blocks' absmax negative."""
    d = _copy(tmp_path, "llama_gqa")
    name = "model.layers.0.self_attn.q_proj.weight"
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    shard = d / index[name]
    tensors = load_file(shard)
    w = tensors[name].copy()
    w[1, 3] = factor * np.abs(w).reshape(-1, 64).max(axis=1).mean()
    save_file({**tensors, name: w}, str(shard), metadata={"format": "pt"})
    return d, name, w


def test_double_quant_outlier_is_reported_with_its_remedy(tmp_path, caplog):
    d, name, w = _with_outlier(tmp_path)
    qt = quant.quantize(w, "nf4", 64, True)
    assert (np.asarray(quant.block_absmax(qt)) < 0).sum() > 32  # the format's failure, kept bnb-exact
    with caplog.at_level("WARNING"):
        load_pretrained(d, quant=QuantConfig(), dtype=jnp.float32, progress=False)
    (msg,) = [r.getMessage() for r in caplog.records if "block-wise relative MSE" in r.getMessage()]
    err = quant.measure_error(w, qt)["block_rel_mse"]
    assert msg.startswith(f"{name} quantizes with block-wise relative MSE {err:.3g}")
    assert "double quantization causes it" in msg
    assert "config.quant.no_double_quant=('model.layers.0.self_attn.q_proj',)" in msg
    # both remedies work: no double quant for that tensor, or 16 bits
    caplog.clear()
    with caplog.at_level("WARNING"):
        _, v = load_pretrained(d, quant=QuantConfig(no_double_quant=("layers.0.self_attn.q_proj",)), progress=False)
    assert not [r for r in caplog.records if "block-wise relative MSE" in r.getMessage()]
    q = v["base"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert not q.double_quant and v["base"]["layers_0"]["self_attn"]["k_proj"]["kernel"].double_quant
    assert quant.measure_error(w, q)["block_rel_mse"] < 0.02
    _, v = load_pretrained(d, quant=QuantConfig(skip_modules=("layers.0.self_attn.q_proj",)), progress=False)
    assert set(v["base"]) >= {"layers_0", "layers_1"}  # one layer stored apart: the loader unrolls them
    kept = v["base"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert not quant.is_quantized(kept)
    np.testing.assert_array_equal(np.asarray(kept, np.float32), np.asarray(jnp.asarray(w, jnp.bfloat16), np.float32))


def test_a_normal_checkpoint_reports_no_outliers(caplog):
    with caplog.at_level("WARNING"):
        load_pretrained(HF / "llama_gqa", quant=QuantConfig(), progress=False)
    assert not [r for r in caplog.records if "block-wise relative MSE" in r.getMessage()]


def test_skip_modules_round_trip_through_the_bitsandbytes_format(tmp_path):
    """A linear kept in 16 bits is written as a plain tensor listed in llm_int8_skip_modules (as
    transformers + bitsandbytes write it) and loads back as stored."""
    cfg = QuantConfig(skip_modules=("layers.1.mlp.down_proj",))
    _, v = load_pretrained(HF / "llama_gqa", quant=cfg, dtype=jnp.float32, progress=False)
    save_pretrained_4bit(tmp_path, read_config(HF / "llama_gqa")[1], v["base"])
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["quantization_config"]["llm_int8_skip_modules"] == ["lm_head", "model.layers.1.mlp.down_proj"]
    _, back = load_pretrained(tmp_path, quant=None, dtype=jnp.float32, progress=False)
    assert len(_linears(back["base"])) == 13
    np.testing.assert_array_equal(
        np.asarray(back["base"]["layers_1"]["mlp"]["down_proj"]["kernel"]),
        np.asarray(v["base"]["layers_1"]["mlp"]["down_proj"]["kernel"]),
    )


def test_scanned_load_stacks_the_unrolled_tensors():
    """The scanned layout holds, at index i of every leaf, exactly layer i's tensor of the unrolled one."""
    cfg = QuantConfig()
    _, stacked = load_pretrained(HF / "llama_gqa", quant=cfg, lora=LoRAConfig(rank=4), seed=1, progress=False)
    _, unrolled = load_pretrained(
        HF / "llama_gqa", quant=cfg, lora=LoRAConfig(rank=4), seed=1, scan_layers=False, progress=False
    )
    assert "layers" in stacked["base"] and "layers_0" in unrolled["base"]
    a = traverse_util.flatten_dict(unstack_layers(stacked["base"]))
    b = traverse_util.flatten_dict(unrolled["base"])
    assert a.keys() == b.keys()
    for k in a:
        for x, y in zip(jax.tree.leaves(a[k]), jax.tree.leaves(b[k]), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(k))


def test_a_sharding_tree_of_another_layout_is_named():
    """A ``sharding=`` for the unrolled layout given to a scanned load: named, not a KeyError."""
    from qlora_jax import parallel
    from qlora_jax.checkpoints import pretrained_model
    from qlora_jax.train.state import abstract_variables

    unrolled = pretrained_model(HF / "llama_gqa", scan_layers=False)
    mesh = parallel.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
    wrong = parallel.frozen_shardings(abstract_variables(unrolled)["base"], mesh)
    with pytest.raises(
        ValueError, match=r"sharding= does not match this model's base \(scan_layers=True\): missing \['layers"
    ):
        load_pretrained(HF / "llama_gqa", sharding=wrong, progress=False)


@pytest.mark.parametrize(
    "fields,named",
    [
        (dict(model_type="qwen3"), "qk_norm=False (model_type 'qwen3': True)"),
        (dict(model_type="gemma2", query_pre_attn_scalar=256), "sandwich_norms=False (model_type 'gemma2': True)"),
    ],
)
def test_a_config_its_model_type_would_read_back_otherwise_is_not_written(tmp_path, fields, named):
    """LlamaConfig(model_type="qwen3") without qk_norm is a model transformers (and our loader) would
    compute with q/k norms from the config.json written for it: refused, naming the field."""
    from qlora_jax.checkpoints.hf import config_to_hf

    with pytest.raises(ValueError, match=re.escape(named)):
        config_to_hf(LlamaConfig(**fields))
    fixed = read_config(HF / "qwen3")[0]
    assert LlamaConfig.from_hf(config_to_hf(fixed)) == fixed  # a config read from a checkpoint is written as it was
