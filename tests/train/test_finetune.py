"""The real entry point (python -m experiments.finetune) on a shrunken tiny config: a run, a run
killed after a checkpoint and resumed (identical metrics), exports checked against real PEFT
output, and config typos rejected."""

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from finetune_cli import ROOT, SHRINK, SMALL
from finetune_cli import cmd as _cmd
from finetune_cli import metrics as _metrics
from finetune_cli import run as _run
from safetensors.numpy import load_file

PEFT_FIXTURE = ROOT / "tests" / "fixtures" / "peft" / "llama_gqa_r4"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    _run(workdir, "--config.train.steps=30", "--config.checkpoint_every=10")
    return workdir


def test_run_writes_metrics_checkpoint_and_exports(full_run):
    before, *rows = _metrics(full_run)
    assert before["step"] == 0 and {"eval_loss", "exact_match", "exact_match_normalized"} <= set(before)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert rows[9]["eval_loss"] < before["eval_loss"]
    losses = np.array([r["loss"] for r in rows])
    # LoRA on a random 1-layer base learns slowly (measured: ~5.5 -> ~5.2 in 30 steps); single
    # steps scatter by ~0.05, so a 0.1 drop of 5- and 10-step means is well outside the noise
    assert losses[-10:].mean() < losses[:5].mean() - 0.1
    assert np.polyfit(np.arange(30), losses, 1)[0] < 0
    assert {"eval_loss", "eval_perplexity"} <= set(rows[9]) and np.isfinite(rows[9]["eval_perplexity"])
    final = json.loads((full_run / "final_metrics.json").read_text())
    assert final["step"] == 30 and 0.0 <= final["exact_match"] <= 1.0
    assert sorted(p.name for p in (full_run / "checkpoints").iterdir() if p.name.isdigit()) == ["20", "30"]
    assert (full_run / "export" / "base" / "config.json").exists()
    assert len((full_run / "samples.jsonl").read_text().splitlines()) == 2
    events = list((full_run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and b"eval_perplexity" in events[0].read_bytes()


def test_adapter_export_matches_real_peft_layout(full_run):
    ours = load_file(full_run / "export" / "adapter" / "adapter_model.safetensors")
    theirs = load_file(PEFT_FIXTURE / "adapter_model.safetensors")
    # same naming scheme: for layer 0 the same tensor names, A [r, in] and B [out, r]
    layer0 = sorted(k for k in theirs if ".layers.0." in k)
    assert sorted(k for k in ours if ".layers.0." in k) == layer0
    assert ours["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (16, 64)
    assert ours["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (64, 16)
    cfg = json.loads((full_run / "export" / "adapter" / "adapter_config.json").read_text())
    ref = json.loads((PEFT_FIXTURE / "adapter_config.json").read_text())
    for key in ("peft_type", "task_type", "bias", "fan_in_fan_out", "use_rslora", "use_dora", "init_lora_weights"):
        assert cfg[key] == ref[key], key
    assert sorted(cfg["target_modules"]) == sorted(ref["target_modules"])
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (16, 32.0, 0.05)


def test_killed_run_resumes_with_the_metrics_of_an_uninterrupted_one(full_run, tmp_path):
    """The full run's 30 steps logged every 7 (checkpointed every 2, evaluated every 10), killed at
    a checkpoint inside a logging window and resumed: each row counts the tokens of every step
    since the previous row (the open window travels in the checkpoint), evaluations off the
    logging steps get rows of their own, and everything else equals the full run's same step."""
    args = ("--config.train.steps=30", "--config.checkpoint_every=2", "--config.log_every=7")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(_cmd(tmp_path, *args), cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "checkpoints" / "2").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "final_metrics.json").exists(), "the run finished before it could be killed"
    step = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert step % 7, f"killed at step {step}, a window boundary: nothing to check"
    _run(tmp_path, *args)
    every, cut = _metrics(full_run), _metrics(tmp_path)
    assert [r["step"] for r in cut] == [0, 7, 10, 14, 20, 21, 28, 30]
    assert cut[0] == every[0]
    for before, row in itertools.pairwise(cut):
        steps = every[before["step"] + 1 : row["step"] + 1]
        for key in ("processed_tokens", "target_tokens"):
            assert row.pop(key) == sum(r.pop(key) for r in steps), (row["step"], key)
        assert row == steps[-1]  # loss, norms, learning rate; the evaluations at 10, 20 and 30
    assert "eval_loss" in cut[2] and "eval_loss" not in cut[1]


def test_evaluate_only_refuses_a_workdir_that_holds_a_run(full_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(full_run, workdir)
    before = (workdir / "metrics.jsonl").read_text()
    result = _run(workdir, "--config.train.steps=0", check=False)
    assert result.returncode != 0
    assert f"--workdir={workdir} holds a run (checkpoint at step 30); use a new --workdir" in result.stderr
    assert (workdir / "metrics.jsonl").read_text() == before


def test_misspelled_config_key_is_rejected(tmp_path):
    result = _run(tmp_path, "--config.lora.rnak=4", check=False)
    assert result.returncode != 0
    assert "rnak" in result.stderr


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path):
    result = _run(
        tmp_path,
        "--config.train.learning_rate=1e30",
        "--config.train.max_grad_norm=1e30",
        "--config.train.steps=10",
        "--config.checkpoint_every=1",
        check=False,
    )
    assert result.returncode != 0
    assert "non-finite loss nan at step 2" in result.stderr
    assert "The last checkpoint (step 1)" in result.stderr
    assert (tmp_path / "checkpoints" / "1").is_dir() and not (tmp_path / "checkpoints" / "2").exists()


def test_llama_alpaca_config_is_the_qlora_recipe():
    from experiments.configs import llama_alpaca

    c = llama_alpaca.get_config()
    assert (c.quant.type, c.quant.double_quant, c.quant.block_size) == ("nf4", True, 64)
    assert (c.lora.rank, c.lora.alpha, c.lora.dropout, len(c.lora.targets)) == (64, 16.0, 0.1, 7)
    assert c.lora.dtype == "bfloat16"  # qlora.py casts LoRA layers to bf16; the planner's 33B-in-24GB assumes it
    assert (c.train.learning_rate, c.train.warmup_ratio, c.train.max_grad_norm) == (2e-4, 0.03, 0.3)
    assert c.train.lr_schedule == "constant"
    assert (c.train.batch_size * c.train.accum_steps, c.train.optimizer, c.train.remat) == (16, "paged_adamw", True)
    assert c.data.train_on_source is False and c.data.format == "alpaca"


def test_merged_and_quantized_exports_load_back(tmp_path):
    """export/merged reloads as a plain HF checkpoint whose logits equal the adapted model's;
    export/quantized reloads as a bitsandbytes 4-bit checkpoint with the same 4-bit bytes."""
    import jax
    import jax.numpy as jnp

    from qlora_jax.checkpoints import export_gguf, export_hf, export_quantized, load_pretrained
    from qlora_jax.nn import LoRAConfig, QuantConfig
    from qlora_jax.nn.llama import unstack_layers

    src = ROOT / "tests" / "fixtures" / "hf" / "llama_gqa"
    model, v = load_pretrained(
        src, quant=QuantConfig(), lora=LoRAConfig(rank=4, dropout=0.0), dtype=jnp.float32, progress=False
    )
    v["params"] = jax.tree.map(lambda a: a + 0.01, v["params"])
    export_hf(tmp_path / "merged", model.config, v["base"], dtype=jnp.float32, params=v["params"], lora=model.lora)
    # the merged weight is dequant(W) + s * B @ A rounded to bf16: within one bf16 step of the
    # float64 merge, element by element
    from qlora_jax import quant

    tensor = load_file(tmp_path / "merged" / "model.safetensors")["model.layers.1.mlp.down_proj.weight"]
    node = unstack_layers(v["base"])["layers_1"]["mlp"]["down_proj"]
    adapter = unstack_layers(v["params"])["layers_1"]["mlp"]["down_proj"]
    a, b = (np.asarray(adapter[k], np.float64) for k in ("lora_a", "lora_b"))
    exact = np.asarray(quant.dequantize(node["kernel"], jnp.float32), np.float64) + model.lora.scale * b @ a
    assert np.all(np.abs(tensor - exact) <= np.abs(exact) * 2.0**-8 + 1e-30)
    merged_model, merged = load_pretrained(tmp_path / "merged", quant=None, dtype=jnp.float32, progress=False)
    ids = np.arange(24, dtype=np.int32).reshape(2, 12) * 7 % 256
    want = np.asarray(model.apply(v, ids))
    got = np.asarray(merged_model.apply(merged, ids))
    # bf16 weights (relative rounding <= 2^-9 each) move logits by about that fraction
    assert np.abs(got - want).max() <= 2.0**-8 * np.abs(want).max()
    # export.gguf: the same float32 merge, each matrix rounded once to float16 (1-D tensors stay
    # float32, as llama.cpp writes them): equal to the merged transformers export in those dtypes
    from qlora_jax.checkpoints import open_gguf

    export_gguf(tmp_path / "model.gguf", model.config, v["base"], None, "f16", params=v["params"], lora=model.lora)
    for dtype in (jnp.float16, jnp.float32):
        export_hf(tmp_path / dtype.__name__, model.config, v["base"], dtype=dtype, params=v["params"], lora=model.lora)
    f16, f32 = (load_file(tmp_path / n / "model.safetensors") for n in ("float16", "float32"))
    _, _, tensors = open_gguf(tmp_path / "model.gguf")
    assert set(tensors.files) == set(f16)
    for name, x in f16.items():
        np.testing.assert_array_equal(tensors.get(name), (x if x.ndim == 2 else f32[name]).astype(np.float32), name)
    export_quantized(tmp_path / "quantized", model.config, v["base"], QuantConfig())
    _, q = load_pretrained(tmp_path / "quantized", quant=None, dtype=jnp.float32, progress=False)
    a = v["base"]["layers"]["mlp"]["up_proj"]["kernel"]  # both scanned: stacked alike
    b = q["base"]["layers"]["mlp"]["up_proj"]["kernel"]
    np.testing.assert_array_equal(np.asarray(a.packed), np.asarray(b.packed))


def test_full_parameter_pre_step_exports_a_base_the_next_run_loads(tmp_path):
    """configs/tiny_pretrain.py trains every base weight; export/model (weights + byte tokenizer)
    is then a model_path: an evaluation-only run (train.steps=0) with a fresh adapter (B = 0) on it
    scores the same eval loss."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    # configs/tiny_pretrain.py has no small variant: its sizes come as flags (SHRINK)
    small = [a for a in SMALL if not a.startswith(("--config.train.learning_rate", "--config.num_generate"))]
    common = [*SHRINK, *small, "--config.num_generate=0", "--config.train.dtype=float32"]
    cmd = [sys.executable, "-m", "experiments.finetune", "--config=experiments/configs/tiny_pretrain.py"]
    subprocess.run(
        [*cmd, f"--workdir={tmp_path / 'pre'}", *common, "--config.train.steps=20", "--config.eval_every=20"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    _, *rows = _metrics(tmp_path / "pre")  # the first row is the evaluation before training
    assert np.mean([r["loss"] for r in rows[-5:]]) < np.mean([r["loss"] for r in rows[:5]]) - 0.5
    model = tmp_path / "pre" / "export" / "model"
    assert sorted(p.name for p in model.iterdir()) == ["byte_tokenizer.json", "config.json", "model.safetensors"]
    again = [
        sys.executable, "-m", "experiments.finetune", "--config=experiments/configs/tiny.py",
        f"--workdir={tmp_path / 'ft'}", *common, f"--config.model_path={model}", "--config.quant.enabled=False",
        "--config.lora.rank=4", "--config.train.steps=0",
        "--config.data.families=('reverse', 'upper')",
    ]  # fmt: skip
    subprocess.run(again, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    (only,) = _metrics(tmp_path / "ft")
    assert only["step"] == 0 and only["eval_loss"] == pytest.approx(rows[-1]["eval_loss"], rel=1e-6)


def test_full_parameter_training_refuses_a_quantized_base(tmp_path):
    result = _run(tmp_path, "--config.train.trainable=full", check=False)
    assert result.returncode != 0
    assert "config.train.trainable='full' trains the unquantized base itself" in result.stderr


def test_full_parameter_training_refuses_a_4bit_checkpoint(tmp_path):
    from experiments.configs import tiny
    from qlora_jax import parallel
    from qlora_jax.data import ByteTokenizer
    from qlora_jax.train import train_lib

    model_path = tmp_path / "bnb"
    shutil.copytree(ROOT / "tests" / "fixtures" / "hf" / "llama_bnb4bit", model_path)
    ByteTokenizer().save(model_path)
    c = tiny.get_config()
    c.model_path, c.quant.enabled, c.lora.rank, c.train.trainable = str(model_path), False, 0, "full"
    mesh = parallel.make_mesh({"data": -1, "fsdp": 1})
    # two layers x seven linears stored as bitsandbytes NF4
    with pytest.raises(ValueError, match=rf"16/32-bit base, but config.model_path={model_path} stores 14 weights"):
        train_lib.setup(c, mesh)


def test_a_tokenizer_with_ids_past_the_vocab_is_refused_at_setup(tmp_path):
    """259 byte-tokenizer ids on a 256-row embedding used to show only as "non-finite loss nan at step 2"."""
    from experiments.configs import tiny
    from qlora_jax import parallel
    from qlora_jax.data import ByteTokenizer
    from qlora_jax.train import train_lib

    model_path = tmp_path / "ckpt"
    shutil.copytree(ROOT / "tests" / "fixtures" / "hf" / "llama_gqa", model_path)
    ByteTokenizer().save(model_path)  # 259 ids
    c = tiny.get_config()
    c.model_path = str(model_path)
    with pytest.raises(
        ValueError, match=r"has 259 ids but the model's embedding has 256 rows \(.*config.json vocab_size"
    ):
        train_lib.setup(c, parallel.make_mesh({"data": -1, "fsdp": 1}))


def test_a_split_too_small_for_a_batch_is_named_with_what_to_change(tmp_path):
    from experiments.configs import tiny
    from qlora_jax.data import ByteTokenizer
    from qlora_jax.train import train_lib

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"say {i}", "output": str(i)}) + "\n" for i in range(30)))
    c = tiny.get_config()
    c.data.kind, c.data.path, c.train.batch_size = "jsonl", str(path), 4
    with pytest.raises(
        ValueError, match=r"eval split: 3 examples cannot fill a batch of config.train.batch_size=4 \(the"
    ):
        train_lib.build_data(c, ByteTokenizer())


def test_a_nan_stop_before_the_first_checkpoint_says_there_is_none(tmp_path):
    """It said "The last checkpoint (step None) ... is intact"."""
    from qlora_jax.train import train_lib
    from qlora_jax.train.workdir import Checkpoints

    ckpt = Checkpoints(tmp_path)
    with pytest.raises(FloatingPointError) as e:
        train_lib._stop_diverged(ckpt, tmp_path, "non-finite loss nan at step 2", checkpoint_every=10)
    ckpt.close()
    assert str(e.value) == (
        "non-finite loss nan at step 2; stopping. No checkpoint was written yet (the first is due at step 10): "
        "there is none to resume."
    )


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """A random tiny LLaMA whose vocabulary is the SmolLM2-style ChatML tokenizer's (tests/fixtures/chat),
    and a messages JSONL of arithmetic questions."""
    import jax
    import jax.numpy as jnp

    from qlora_jax.checkpoints import export_hf
    from qlora_jax.data import load_tokenizer
    from qlora_jax.nn import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("chat")
    src = ROOT / "tests" / "fixtures" / "chat" / "smollm2"
    tok = load_tokenizer(src)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)  # fmt: skip
    frozen = LlamaForCausalLM(cfg, dtype=jnp.float32).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["base"]
    export_hf(root / "model", cfg, frozen, dtype=jnp.bfloat16)  # as checkpoints on the Hub are stored
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, root / "model" / name)
    rng = np.random.default_rng(0)
    with (root / "chat.jsonl").open("w") as f:
        for _ in range(80):
            a, b = (int(x) for x in rng.integers(0, 50, 2))
            turns = [{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": str(a + b)}]
            if rng.random() < 0.5:  # some two-turn conversations: loss on both answers
                turns += [
                    {"role": "user", "content": "And doubled?"},
                    {"role": "assistant", "content": str(2 * (a + b))},
                ]
            f.write(json.dumps({"messages": turns}) + "\n")
    return root


def _chat_run(root, workdir, *extra):
    return _run(
        workdir, f"--config.model_path={root / 'model'}", "--config.data.kind=jsonl", "--config.data.format=chat",
        f"--config.data.path={root / 'chat.jsonl'}", "--config.data.source_max_len=224",
        "--config.data.target_max_len=32", "--config.train.steps=6", "--config.checkpoint_every=6",
        "--config.eval_every=3", "--config.num_generate=3", *extra,
    )  # fmt: skip


def test_chat_data_in_the_models_template_packed_and_scored(chat_checkpoint, tmp_path):
    """messages JSONL on a ChatML checkpoint: generations from the template's generation prompt and
    scored before training and at each eval; packing puts more real tokens in each step."""
    _chat_run(chat_checkpoint, tmp_path / "every", "--config.data.packing=True", "--config.log_every=1")
    every = _metrics(tmp_path / "every")
    assert every[0]["step"] == 0 and "exact_match" in every[0] and "exact_match_normalized" in every[0]
    assert [r["step"] for r in every] == list(range(7)) and "exact_match" in every[3]
    # the host's count of the loss targets is the device's (tokens) for packed rows too
    assert all(r["processed_tokens"] > r["target_tokens"] == r["tokens"] > 0 for r in every[1:])
    samples = [json.loads(line) for line in (tmp_path / "every" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3
    for s in samples:  # the SmolLM2 template's default system prompt, then the generation prompt
        assert s["source"].startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
        assert s["source"].endswith("<|im_start|>assistant\n") and s["target"].isdigit()
    _chat_run(chat_checkpoint, tmp_path / "unpacked", "--config.log_every=1")
    unpacked = _metrics(tmp_path / "unpacked")
    # packing fills rows with several conversations: more tokens per step for the same batch size
    assert sum(r["processed_tokens"] for r in every[1:]) > 2 * sum(r["processed_tokens"] for r in unpacked[1:])
    assert every[0] == unpacked[0]  # evaluation (unpacked in both) before training


def test_chat_recipe_packs_and_keeps_the_qlora_settings():
    from experiments.configs import chat, llama_alpaca

    c, ref = chat.get_config(), llama_alpaca.get_config()
    assert (c.data.format, c.data.train_on, c.data.packing) == ("chat", "all_assistant", True)
    for key in ("quant", "lora", "train"):
        assert c[key].to_dict() == ref[key].to_dict(), key
    assert c.num_generate > 0 and ref.data.format == "alpaca" and not ref.data.packing


def test_a_missing_chat_template_file_names_the_config_key(tmp_path):
    from experiments.configs import tiny
    from qlora_jax.data import ByteTokenizer
    from qlora_jax.train import train_lib

    c = tiny.get_config()
    c.data.chat_template = str(tmp_path / "nope.jinja")
    with pytest.raises(ValueError, match=r"^config.data.chat_template: chat template file '.*nope.jinja' does not"):
        train_lib._chat_template(c, ByteTokenizer())


def test_a_run_started_again_before_its_first_checkpoint_logs_step_0_once(tmp_path):
    """An evaluate-only run killed during its exports (no final_metrics.json) evaluates step 0
    again on the re-run: that row replaces the old one instead of following it."""
    _run(tmp_path, "--config.train.steps=0")
    first = _metrics(tmp_path)
    (tmp_path / "final_metrics.json").unlink()
    _run(tmp_path, "--config.train.steps=0")
    assert [r["step"] for r in _metrics(tmp_path)] == [0] and _metrics(tmp_path) == first


def test_progress_bar_shows_the_compile_and_an_eta_from_the_second_step_then_before_and_after(tmp_path):
    out = _run(tmp_path, "--config.train.steps=4", "--config.progress=True")
    frames = [f.strip() for f in out.stderr.replace("\n", "\r").split("\r") if f.strip().startswith("train")]
    assert frames[0].startswith("train: compiling") and "0/4" in frames[0]
    # after the compiling step no rate yet (it is left out), then one from the steps since
    after_first = [f for f in frames if " 1/4 " in f]
    assert after_first and all(f.startswith("train:") and "<?, ?it/s" in f for f in after_first), after_first
    last = [f for f in frames if " 4/4 " in f][-1]
    assert "?" not in last.split("[", 1)[1], last
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "first_step_seconds" in r]
    assert [r["step"] for r in timed] == [1] and timed[0]["first_step_seconds"] > 0
    # the closing line: the step-0 evaluation (the base as loaded) beside the last one
    before, after = rows[0], rows[-1]
    assert before["step"] == 0 and after["step"] == 4
    assert out.stdout.splitlines()[-1] == (
        f"before training (step 0) -> after (step 4): eval_loss {before['eval_loss']:.2f} -> "
        f"{after['eval_loss']:.2f}, exact_match {before['exact_match']:.3f} -> {after['exact_match']:.3f}"
    )


def test_the_default_config_trains_on_chat_exchanges_of_the_real_model():
    """configs/smollm2.py (make finetune): valid; its synthetic tasks become ChatML exchanges in
    SmolLM2's own template, the loss on each answer and its end-of-turn token only; the held-out
    prompts end at the assistant's turn."""
    pytest.importorskip("gguf")
    from experiments.configs import smollm2
    from qlora_jax.checkpoints import resolve_model_path
    from qlora_jax.data import load_tokenizer
    from qlora_jax.train import train_lib
    from qlora_jax.train.validate import validate_config

    c = smollm2.get_config()
    try:
        resolve_model_path(c.model_path)
    except ValueError as e:
        pytest.skip(str(e))
    c.data.num_train, c.data.num_eval, c.num_generate = 32, 16, 4
    validate_config(c)
    tok = load_tokenizer(c.model_path)
    data = train_lib.build_data(c, tok)
    batch = next(data.train)
    assert batch["segment_ids"].max() >= 2  # packed: several exchanges per row
    ids, mask = batch["input_ids"][0], batch["loss_mask"][0].astype(bool)
    seg = batch["segment_ids"][0]
    first = ids[(seg == 1) & mask]
    text = tok.decode(list(first), skip_special_tokens=False)
    assert text.endswith("<|im_end|>") and "<|im_start|>" not in text, text  # one answer and its end of turn
    whole = tok.decode(list(ids[seg == 1]), skip_special_tokens=False)
    assert whole.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert data.generation[0].prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
