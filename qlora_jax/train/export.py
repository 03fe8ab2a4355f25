"""Exports at the end of training: PEFT adapters, the base model, merged and 4-bit checkpoints.

PEFT's format (peft 0.21): ``adapter_model.safetensors`` with tensors named
``base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight`` (``lora_A``
``[r, in]``, ``lora_B`` ``[out, r]``; no adapter name) and ``adapter_config.json`` (LoraConfig).
"""

from __future__ import annotations

import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from qlora_jax import quant
from qlora_jax.checkpoints.gguf import write_gguf
from qlora_jax.checkpoints.hf import hf_tensor_name, save_pretrained_4bit
from qlora_jax.data.tokenizer import HFTokenizer
from qlora_jax.nn.llama import LlamaConfig, config_to_hf, unstack_layers
from qlora_jax.nn.lora import LoRAConfig, QuantConfig, hf_module_name, merged_weight


def peft_tensor_name(path: tuple[str, ...]) -> str:
    """``("layers_3", "self_attn", "q_proj", "lora_a")`` -> PEFT's tensor name."""
    layer, block, module, leaf = path
    kind = {"lora_a": "lora_A", "lora_b": "lora_B"}[leaf]
    return f"base_model.model.model.layers.{layer.split('_')[1]}.{block}.{module}.{kind}.weight"


def export_peft_adapter(path, params: dict, lora: LoRAConfig, base_model_name_or_path: str | None) -> None:
    root = pathlib.Path(path)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {
        peft_tensor_name(p): np.asarray(jax.device_get(v), np.float32)
        for p, v in traverse_util.flatten_dict(unstack_layers(params)).items()
    }
    save_file(tensors, str(root / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(lora.targets),
        "bias": "none",
        "use_rslora": lora.use_rslora,
        "fan_in_fan_out": False,
        "init_lora_weights": True if lora.init == "default" else "gaussian",
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
    }
    (root / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _hf_tensors(frozen: dict, dtype, params: dict | None = None, lora: LoRAConfig | None = None):
    """The frozen tree as transformers tensors (dequantized), optionally with adapters merged."""
    flat_params = traverse_util.flatten_dict(unstack_layers(params)) if params is not None else {}
    out = {}
    for p, v in traverse_util.flatten_dict(unstack_layers(frozen)).items():
        if p[-1] == "kernel" and p[0] != "lm_head" and (*p[:-1], "lora_a") in flat_params:
            a, b = flat_params[(*p[:-1], "lora_a")], flat_params[(*p[:-1], "lora_b")]
            w = merged_weight(v, a, b, lora.scale).astype(jnp.float32)
        elif isinstance(v, quant.QuantizedTensor):
            w = quant.dequantize(v, jnp.float32)
        else:
            w = v
        out[hf_tensor_name(p)] = np.asarray(jax.device_get(jnp.asarray(w).astype(dtype)))
    return out


def export_hf(path, config: LlamaConfig, frozen: dict, *, dtype=jnp.float32, params=None, lora=None) -> None:
    """Write an unquantized transformers checkpoint (config.json + model.safetensors) of the base,
    with the adapters merged when ``params`` are given."""
    root = pathlib.Path(path)
    root.mkdir(parents=True, exist_ok=True)
    tensors = _hf_tensors(frozen, dtype, params, lora)
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(config_to_hf(config, jnp.dtype(dtype).name), indent=2) + "\n")


def export_quantized(path, config: LlamaConfig, frozen: dict, quant_config: QuantConfig) -> None:
    """Write the base as a transformers + bitsandbytes 4-bit checkpoint."""

    def requantize(p, v):
        if p[-1] != "kernel" or p[0] == "lm_head" or isinstance(v, quant.QuantizedTensor):
            return v
        storage = quant_config.for_module(hf_module_name(p[:-1]))  # None: kept in 16 bits (skip_modules)
        return v if storage is None else storage.quantize(v, hf_tensor_name(p))

    requantized = {p: requantize(p, v) for p, v in traverse_util.flatten_dict(unstack_layers(frozen)).items()}
    save_pretrained_4bit(path, config_to_hf(config), traverse_util.unflatten_dict(requantized))


def export_gguf(path, config: LlamaConfig, frozen: dict, tokenizer, dtype: str = "f16", *, params=None, lora=None):
    """Write the base, with the adapters merged when ``params`` are given, as a GGUF file
    (``f16``, ``bf16`` or ``q8_0``) with the tokenizer and chat template, for llama.cpp / Ollama.

    The merge is done in float32 (``dequant(W) + s·B·A``) and rounded once, to ``dtype``. A
    tokenizer that is not a Hugging Face / GGUF one (the tiny model's byte tokenizer) is left out,
    with a warning: such a file loads in our loader and in transformers, but llama.cpp needs one.
    """
    if not isinstance(tokenizer, HFTokenizer):
        logging.warning("%s: written without tokenizer metadata (%s is not a BPE/SentencePiece tokenizer)",
                        path, type(tokenizer).__name__)  # fmt: skip
        tokenizer = None
    return write_gguf(path, config, _hf_tensors(frozen, jnp.float32, params, lora), tokenizer, dtype)
