r"""QLoRA fine-tuning entry point.

    python -m experiments.finetune --config=experiments/configs/tiny.py --workdir=runs/tiny
    python -m experiments.finetune --config=experiments/configs/tiny.py --workdir=runs/x \
        --config.lora.rank=8 --config.train.steps=50

Unknown or misspelled ``--config.*`` keys are rejected (the config is locked). Re-running the same
command resumes from the latest checkpoint in ``--workdir``.

Several hosts: start the same command on every host (shared ``--workdir``) with
``--coordinator_address=host0:1234 --num_processes=N --process_id=i`` (or the environment variables
``QLORA_COORDINATOR_ADDRESS``, ``QLORA_NUM_PROCESSES``, ``QLORA_PROCESS_ID``); ``config.mesh`` then
spans every host's devices, and only process 0 writes logs and exports.
"""

import json
import pathlib
import warnings

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from qlora_jax.parallel import initialize_distributed
from qlora_jax.train.train_lib import train_and_evaluate
from qlora_jax.train.validate import ConfigError
from qlora_jax.train.workdir import CheckpointError, RunConflict, WorkdirBusy, WorkdirWriteError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (experiments/configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "Multi-host: host:port of process 0 (jax.distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "Multi-host: this process's index, 0 .. num_processes-1.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)  # before any JAX call
    try:
        metrics = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, RunConflict, WorkdirBusy, CheckpointError, WorkdirWriteError, FloatingPointError) as e:
        # what the user must act on: one message, no traceback (everything else keeps its traceback)
        if isinstance(e, CheckpointError):  # the writes orbax abandoned warn at exit; the message says it all
            warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
        raise SystemExit(f"experiments.finetune: {type(e).__name__}: {e}") from None
    logging.info("final metrics: %s", metrics)
    if jax.process_index() == 0:
        print("final:", {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
        summary = _before_after(pathlib.Path(_WORKDIR.value) / "metrics.jsonl", metrics)
        if summary:
            print(summary)


def _before_after(metrics_file: pathlib.Path, final: dict) -> str:
    """``eval_loss 4.28 -> 0.85, exact_match 0.000 -> 0.234`` from the step-0 row (the model as
    loaded) and the final metrics; "" when either has no evaluation."""
    if not metrics_file.exists():
        return ""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    base = next((r for r in rows if r.get("step") == 0), None)
    keys = [k for k in ("eval_loss", "exact_match") if base and k in base and k in final]
    if not keys or final.get("step", 0) == 0:
        return ""
    parts = [
        f"{k} {base[k]:.{2 if k == 'eval_loss' else 3}f} -> {final[k]:.{2 if k == 'eval_loss' else 3}f}" for k in keys
    ]
    return f"before training (step 0) -> after (step {final['step']}): " + ", ".join(parts)


if __name__ == "__main__":
    app.run(main)
