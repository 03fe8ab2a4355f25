"""Checkpoint formats: Hugging Face safetensors (plain and bitsandbytes 4-bit)."""

from qlora_jax.checkpoints.hf import bnb_quant_config, load_pretrained, read_config, save_pretrained_4bit

__all__ = ["bnb_quant_config", "load_pretrained", "read_config", "save_pretrained_4bit"]
