r"""QLoRA fine-tuning entry point.

    python -m experiments.finetune --config=experiments/configs/tiny.py --workdir=runs/tiny
    python -m experiments.finetune --config=experiments/configs/tiny.py --workdir=runs/x \
        --config.lora.rank=8 --config.train.steps=50

Unknown or misspelled ``--config.*`` keys are rejected (the config is locked). Re-running the same
command resumes from the latest checkpoint in ``--workdir``.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from qlora_jax.train.train_lib import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (experiments/configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    metrics = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    logging.info("final metrics: %s", metrics)
    print("final:", {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})


if __name__ == "__main__":
    app.run(main)
