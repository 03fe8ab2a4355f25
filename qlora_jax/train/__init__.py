"""Training: jitted steps and the train_and_evaluate loop (the export formats are in qlora_jax.checkpoints)."""

from qlora_jax.train.steps import TrainState, make_eval_step, make_train_step, token_loss
from qlora_jax.train.train_lib import evaluate_model

__all__ = ["TrainState", "evaluate_model", "make_eval_step", "make_train_step", "token_loss"]
