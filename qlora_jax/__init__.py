"""qlora_jax: QLoRA in JAX — bitsandbytes-exact NF4 weights, LoRA adapters, paged optimizers."""

__version__ = "0.1.0"
