"""Training: jitted steps and the train_and_evaluate loop (the export formats are in qlora_jax.checkpoints)."""

from qlora_jax.train.steps import TrainState, make_eval_step, make_train_step, token_loss

__all__ = ["TrainState", "make_eval_step", "make_train_step", "token_loss"]
