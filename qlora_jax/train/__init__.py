"""Training: jitted steps (and, next, the train_and_evaluate loop)."""

from qlora_jax.train.steps import TrainState, make_eval_step, make_train_step, token_loss

__all__ = ["TrainState", "make_eval_step", "make_train_step", "token_loss"]
