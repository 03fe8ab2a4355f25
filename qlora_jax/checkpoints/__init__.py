"""Checkpoint formats: Hugging Face safetensors (plain and bitsandbytes 4-bit), GGUF (llama.cpp) and
PEFT adapters, in and out, with the name maps between our trees and theirs."""

from qlora_jax.checkpoints.gguf import DEFAULT_MODEL, export_gguf, open_gguf, resolve_model_path, write_gguf
from qlora_jax.checkpoints.hf import (
    bnb_quant_config,
    config_to_hf,
    export_hf,
    export_quantized,
    load_pretrained,
    pretrained_model,
    read_config,
    save_pretrained_4bit,
)
from qlora_jax.checkpoints.peft import export_peft_adapter, load_peft_adapter

__all__ = [
    "DEFAULT_MODEL",
    "bnb_quant_config",
    "config_to_hf",
    "export_gguf",
    "export_hf",
    "export_peft_adapter",
    "export_quantized",
    "load_peft_adapter",
    "load_pretrained",
    "open_gguf",
    "pretrained_model",
    "read_config",
    "resolve_model_path",
    "save_pretrained_4bit",
    "write_gguf",
]
