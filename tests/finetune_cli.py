"""Running the real entry point (``python -m experiments.finetune``) on a shrunken tiny config."""

import json
import os
import subprocess
import sys
from pathlib import Path

from experiments.configs import tiny

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "experiments/configs/tiny.py:small"  # hidden 64, 1 layer, batch 8, 16 eval examples, 1 eval batch
SMALL = [  # what these runs change in the small variant
    "--config.data.num_train=32",
    "--config.data.source_max_len=24",
    "--config.data.target_max_len=8",
    "--config.train.learning_rate=0.01",
    "--config.log_every=1",
    "--config.eval_every=10",
    "--config.num_generate=2",
    "--config.progress=False",
]
# the small variant's sizes as flags, for a config file that has no variant (configs/tiny_pretrain.py)
SHRINK = [f"--config.{key}={value}" for key, value in tiny.SMALL.items()]


def cmd(workdir, *extra, config=CONFIG):
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
