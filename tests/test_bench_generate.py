"""experiments/bench_generate.py: the timed decode is generate()'s, and the report's figures follow from its times;
experiments/bench_train.py's --shape=7b preset."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from finetune_cli import ROOT

from experiments import bench_generate as bg
from qlora_jax.nn import generate

TINY = bg.model_config(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256)
NEW = 8


@pytest.fixture(scope="module")
def result():
    return bg.measure(TINY, [1, 3], prompt_len=5, new_tokens=NEW, repeats=1, lora_rank=4)


def test_the_timed_decode_is_generates_greedy_decode(result):
    """Both variants: the long timed run gives exactly generate()'s new_tokens tokens (at batch 3 only: each
    generate() is one more compilation)."""
    assert set(result["_decoders"]) == {(v, b) for v in bg.VARIANTS for b in (1, 3)}
    for (_, b), (_, tokens) in result["_decoders"].items():
        assert tokens.shape == (b, NEW)
    for v in bg.VARIANTS:
        dec, tokens = result["_decoders"][(v, 3)]
        expected = generate(dec.model, dec.variables, dec.prompt, max_new_tokens=NEW, bucket=False)
        np.testing.assert_array_equal(tokens, np.asarray(expected)[:, 5:], err_msg=v)
    # the variants differ where they should: a 4-bit base and a bf16 one
    assert result["rows"][0]["frozen_mib"] < result["rows"][1]["frozen_mib"]


def test_a_wrong_position_would_show():
    """At the init scale (0.02) attention is near uniform and the tokens barely depend on positions or the cache;
    with the layer kernels x6 they do: the timed decode still equals generate(), one position off does not."""
    model, variables = bg.build(TINY, None, 4, "auto")
    frozen = jax.tree.map(lambda a: a * 6 if a.ndim >= 3 else a, variables["base"])  # [L, out, in] kernels
    variables = {**variables, "base": frozen}
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 5)), jnp.int32)
    expected = np.asarray(generate(model, variables, prompt, max_new_tokens=NEW, bucket=False))[:, 5:]
    dec = bg.Decoder(model, variables, prompt, NEW)
    np.testing.assert_array_equal(np.asarray(dec.run(NEW - 1)), expected)
    dec.position = dec.position + 1
    assert np.any(np.asarray(dec.run(NEW - 1)) != expected)


def test_the_trip_count_is_real(result):
    """The short run stops after its steps (the slope's two points time different amounts of work)."""
    short, long = result["steps"]
    assert (short, long) == (max(1, (NEW - 1) // 4), NEW - 1)
    dec, tokens = result["_decoders"][("nf4", 3)]
    few = np.asarray(dec.run(short))
    np.testing.assert_array_equal(few[:, : short + 1], tokens[:, : short + 1])
    assert np.all(few[:, short + 1 :] == 0) and np.any(tokens[:, short + 1 :] != 0)


def test_figures_follow_from_the_times_and_the_json_has_both_variants(result, tmp_path):
    out = tmp_path / "gen.json"
    bg.write_json(result, str(out))
    data = json.loads(out.read_text())
    assert not any(k.startswith("_") for k in data)
    short, long = data["steps"]
    rows = {(r["variant"], r["batch"]): r for r in data["rows"]}
    assert set(rows) == {(v, b) for v in ("nf4", "bf16") for b in (1, 3)}
    for (_, b), r in rows.items():
        assert r["ms_per_token"] == pytest.approx((r["t_long_ms"] - r["t_short_ms"]) / (long - short))
        assert r["tokens_per_s"] == pytest.approx(b / (r["ms_per_token"] / 1e3))
        assert r["tokens_shape"] == [b, NEW] and np.isfinite(r["prefill_ms"]) and r["compile_s"] > 0
    assert [q["batch"] for q in data["ratios"]] == [1, 3]
    for q in data["ratios"]:
        b = q["batch"]
        quotient = rows[("nf4", b)]["tokens_per_s"] / rows[("bf16", b)]["tokens_per_s"]
        assert q["nf4_over_bf16_tokens_per_s"] == pytest.approx(quotient)
    text = bg.report(result)
    assert "NF4+DQ / bf16 tokens/s at batch 3:" in text and "LoRA r=4 on all linears, unmerged" in text
    if jax.default_backend() != "gpu":
        assert "CPU: ran the reference (XLA) path" in text
        assert {r["qmatmul"] for r in data["rows"] if r["variant"] == "nf4"} == {"xla"}


def test_default_vocab_keeps_the_heads_share_of_the_32_layer_model():
    assert bg.default_vocab(32) == 128256
    assert bg.default_vocab(4) == 16000
    with pytest.raises(ValueError, match="new_tokens must be >= 3"):
        bg.measure(TINY, [1], prompt_len=2, new_tokens=2, repeats=1)


def test_bench_train_7b_preset_is_llama_7b_layers():
    """In a child: bench_train defines --batch/--model at import, as plan.py does (absl refuses both in one process)."""
    code = (
        "import dataclasses, json; from experiments.bench_train import train_config as c; "
        "print(json.dumps([dataclasses.asdict(c('7b')), dataclasses.asdict(c('7b', layers=3)), "
        "dataclasses.asdict(c('', 512, None))]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    preset, deeper, default = json.loads(done.stdout.strip().splitlines()[-1])
    dims = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
    assert [preset[k] for k in dims] == [4096, 11008, 32, 32, 2]
    assert [deeper[k] for k in dims] == [4096, 11008, 32, 32, 3]
    assert [default[k] for k in dims] == [512, 1344, 4, 4, 4]  # the flags' old defaults, unchanged
    assert preset["vocab_size"] == default["vocab_size"] == 259


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match=r"--batch must list positive batch sizes; got \[0\]"):
        bg.measure(TINY, [0], prompt_len=5, new_tokens=NEW, repeats=1)
    with pytest.raises(ValueError, match=r"--prompt_len and --repeats must be >= 1; got 0 and 1"):
        bg.measure(TINY, [1], prompt_len=0, new_tokens=NEW, repeats=1)
