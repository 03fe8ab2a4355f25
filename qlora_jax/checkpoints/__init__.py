"""Checkpoint formats: Hugging Face safetensors (plain and bitsandbytes 4-bit) and GGUF (llama.cpp)."""

from qlora_jax.checkpoints.gguf import DEFAULT_MODEL, open_gguf, resolve_model_path, write_gguf
from qlora_jax.checkpoints.hf import bnb_quant_config, load_pretrained, read_config, save_pretrained_4bit

__all__ = [
    "DEFAULT_MODEL",
    "bnb_quant_config",
    "load_pretrained",
    "open_gguf",
    "read_config",
    "resolve_model_path",
    "save_pretrained_4bit",
    "write_gguf",
]
