"""Layers and models: LoRADense, the LLaMA-family decoder and the shapes of published models (presets)."""

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
from qlora_jax.nn.merge import merge_adapters
from qlora_jax.nn.presets import PRESETS, model_config, preset

__all__ = [
    "PRESETS",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LoRAConfig",
    "LoRADense",
    "QuantConfig",
    "Variables",
    "check_trainable",
    "generate",
    "init_cache",
    "merge_adapters",
    "merge_params",
    "merged_weight",
    "model_config",
    "preset",
    "sample_token",
    "split_params",
]
