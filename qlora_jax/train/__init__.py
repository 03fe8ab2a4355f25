"""Training: jitted steps, the train_and_evaluate loop and exports."""

from qlora_jax.train.steps import TrainState, make_eval_step, make_train_step, token_loss

__all__ = ["TrainState", "make_eval_step", "make_train_step", "token_loss"]
