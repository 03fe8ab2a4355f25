"""Running the real entry point (``python -m experiments.finetune``) on a shrunken tiny config."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--config.model.hidden_size=64",
    "--config.model.intermediate_size=128",
    "--config.model.num_hidden_layers=1",
    "--config.data.num_train=32",
    "--config.data.num_eval=16",
    "--config.data.source_max_len=24",
    "--config.data.target_max_len=8",
    "--config.train.batch_size=8",
    "--config.train.learning_rate=0.01",
    "--config.log_every=1",
    "--config.eval_every=10",
    "--config.eval_batches=1",
    "--config.num_generate=2",
    "--config.progress=False",
]


def cmd(workdir, *extra, config="experiments/configs/tiny.py"):
    return [sys.executable, "-m", "experiments.finetune", f"--config={config}", f"--workdir={workdir}", *SMALL, *extra]


def run(workdir, *extra, check=True, timeout=300, **kwargs):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        cmd(workdir, *extra), cwd=ROOT, env=env, capture_output=True, text=True, check=check, timeout=timeout, **kwargs
    )


TIMING = ("tokens_per_sec", "target_tokens_per_sec", "first_step_seconds")  # wall clock: the keys a rerun may change


def metrics(workdir):
    """The rows of ``metrics.jsonl`` without the timing keys: what a resumed run must reproduce."""
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
