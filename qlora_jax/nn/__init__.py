"""Layers and models: LoRADense and the LLaMA-family decoder."""

from qlora_jax.nn.generate import generate, sample_token
from qlora_jax.nn.llama import LlamaConfig, LlamaForCausalLM, init_cache
from qlora_jax.nn.lora import (
    LoRAConfig,
    LoRADense,
    QuantConfig,
    Variables,
    check_trainable,
    merge_params,
    merged_weight,
    split_params,
)

__all__ = [
    "LlamaConfig",
    "LlamaForCausalLM",
    "LoRAConfig",
    "LoRADense",
    "QuantConfig",
    "Variables",
    "check_trainable",
    "generate",
    "init_cache",
    "merge_params",
    "merged_weight",
    "sample_token",
    "split_params",
]
