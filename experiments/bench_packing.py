r"""Sequence packing vs one conversation per row: padding and tokens/s on a real model, one run.

    python -m experiments.bench_packing --model_path=/path/to/SmolLM2-135M-Instruct
    python -m experiments.bench_packing --model_path=... --data=chat.jsonl --format=chat

The chat recipe (``experiments/configs/chat.py``: NF4 + DQ, LoRA r=64 on all linears, paged AdamW)
with the lengths of ``llama_alpaca`` (rows of 384 + 128 tokens) unless flags say otherwise, on
conversations in the model's own chat template. Without ``--data`` the conversations are the
synthetic task families as instructions (one to three exchanges each, 40-140 tokens in
SmolLM2's template, about the 60-token Alpaca rows of the QLoRA recipe). Both layouts run the
same jitted train step of the real entry point (``train_lib.setup`` / ``build_data`` /
``jit_train_step``) on the same model and state, compiled first, then ``--steps`` timed steps of
each, interleaved (packed, unpacked, packed, ...) so that a noisy machine slows both alike.

Reported per layout: padding fraction of the rows, median step time, processed (non-padding)
tokens/s, target tokens/s, and the packed / unpacked ratios.
"""

from __future__ import annotations

import json
import pathlib
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

_MODEL = flags.DEFINE_string("model_path", None, "An HF checkpoint directory (safetensors + tokenizer).")
_DATA = flags.DEFINE_string("data", None, "JSONL of conversations (default: synthetic tasks as chat).")
_FORMAT = flags.DEFINE_enum("format", "chat", ["chat", "sharegpt", "alpaca"], "--data's format.")
_BATCH = flags.DEFINE_integer("batch", 4, "Rows per step.")
_SOURCE = flags.DEFINE_integer("source_max_len", 384, "data.source_max_len (row = source + target).")
_TARGET = flags.DEFINE_integer("target_max_len", 128, "data.target_max_len.")
_STEPS = flags.DEFINE_integer("steps", 4, "Timed steps per layout.")
_NUM = flags.DEFINE_integer("num_conversations", 600, "Synthetic conversations (without --data).")
flags.mark_flag_as_required("model_path")


def synthetic_conversations(n: int, seed: int) -> list[dict]:
    """``{"messages": [...]}`` records: 1-3 user/assistant exchanges of the synthetic task families."""
    from qlora_jax.data.synthetic import make_examples

    rng = np.random.default_rng(seed)
    turns = iter(make_examples(3 * n, seed))
    records = []
    for _ in range(n):
        messages = []
        for _ in range(int(rng.integers(1, 4))):
            ex = next(turns)
            question = ex.source.removeprefix("Q: ").removesuffix("\nA: ")
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": ex.target}]
        records.append({"messages": messages})
    return records


def _config(data_path: str, packing: bool):
    from experiments.configs import chat

    c = chat.get_config()
    c.model_path = _MODEL.value
    c.data.path, c.data.format, c.data.packing = data_path, _FORMAT.value, packing
    c.data.source_max_len, c.data.target_max_len = _SOURCE.value, _TARGET.value
    c.train.batch_size, c.train.accum_steps = _BATCH.value, 1
    c.progress = False
    return c


def main(argv):
    del argv
    from qlora_jax import parallel
    from qlora_jax.train import train_lib, validate
    from qlora_jax.train.steps import target_mask

    with tempfile.TemporaryDirectory() as tmp:
        data_path = _DATA.value
        if data_path is None:
            data_path = str(pathlib.Path(tmp) / "chat.jsonl")
            with open(data_path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in synthetic_conversations(_NUM.value, 0))
        configs = {name: _config(data_path, packing) for name, packing in (("packed", True), ("unpacked", False))}
        for c in configs.values():
            validate.validate_config(c)
        mesh = parallel.make_mesh(configs["packed"].mesh.to_dict())
        built = train_lib.setup(configs["packed"], mesh)
        model, tok, frozen, state = built.model, built.tokenizer, built.base, built.state
        data = {name: train_lib.build_data(c, tok).train for name, c in configs.items()}
    step = train_lib.jit_train_step(model, built.optimizer, built.state_shardings, seed=0)
    sharding = parallel.batch_sharding(mesh, 3, batch_axis=1)
    row = _SOURCE.value + _TARGET.value
    counts = {name: {"tokens": 0, "targets": 0, "examples": 0, "times": []} for name in data}

    def run(name, timed: bool):
        nonlocal state
        host = next(data[name])
        batch = parallel.global_batch({k: v[None] for k, v in host.items()}, sharding)
        t = time.perf_counter()
        state, metrics = step(state, frozen, batch)
        jax.block_until_ready(metrics)
        if timed:
            c = counts[name]
            c["times"].append(time.perf_counter() - t)
            c["tokens"] += int(host["attention_mask"].sum())
            c["targets"] += int(target_mask(host, np).sum())
            packed = "segment_ids" in host  # segment ids count 1, 2, ... per row
            c["examples"] += int(host["segment_ids"].max(axis=1).sum()) if packed else len(host["input_ids"])

    with jax.set_mesh(mesh):
        for name in data:  # compile (and one warm step) per layout
            t = time.perf_counter()
            run(name, timed=False)
            print(f"{name}: first step (compile) {time.perf_counter() - t:.1f} s")
        for _ in range(_STEPS.value):
            for name in data:
                run(name, timed=True)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {_MODEL.value}; rows {_BATCH.value} x {row}; "
          f"median of {_STEPS.value} steps per layout, interleaved")  # fmt: skip
    print(f"{'':>9} {'padding':>8} {'examples/row':>13} {'step s':>7} {'tokens/s':>9} {'target tok/s':>13}")
    result = {}
    for name, c in counts.items():
        steps = len(c["times"])
        pad = 1.0 - c["tokens"] / (steps * _BATCH.value * row)
        med = float(np.median(c["times"]))
        per_step = c["tokens"] / steps, c["targets"] / steps
        result[name] = {"padding": pad, "step_s": med, "tokens_s": per_step[0] / med, "targets_s": per_step[1] / med}
        print(f"{name:>9} {pad:>8.1%} {c['examples'] / (steps * _BATCH.value):>13.2f} {med:>7.2f} "
              f"{per_step[0] / med:>9.0f} {per_step[1] / med:>13.0f}")  # fmt: skip
    print(f"packed rows of the whole epoch: {data['packed'].padding_fraction():.1%} padding")
    p, u = result["packed"], result["unpacked"]
    print(f"packed / unpacked: step time {p['step_s'] / u['step_s']:.2f}x, processed tokens/s "
          f"{p['tokens_s'] / u['tokens_s']:.2f}x, target tokens/s {p['targets_s'] / u['targets_s']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    app.run(main)
