"""PEFT LoRA adapters out: the adapters of a trained model in the format HF PEFT loads.

PEFT's format (peft 0.21): ``adapter_model.safetensors`` with tensors named
``base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight`` (``lora_A``
``[r, in]``, ``lora_B`` ``[out, r]``; no adapter name) and ``adapter_config.json`` (LoraConfig).
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from qlora_jax.nn.llama import unstack_layers
from qlora_jax.nn.lora import LoRAConfig


def peft_tensor_name(path: tuple[str, ...]) -> str:
    """``("layers_3", "self_attn", "q_proj", "lora_a")`` -> PEFT's tensor name."""
    layer, block, module, leaf = path
    kind = {"lora_a": "lora_A", "lora_b": "lora_B"}[leaf]
    return f"base_model.model.model.layers.{layer.split('_')[1]}.{block}.{module}.{kind}.weight"


def export_peft_adapter(path, params: dict, lora: LoRAConfig, base_model_name_or_path: str | None) -> None:
    """Write the adapters ``params`` (scanned or unrolled layers) as a PEFT adapter directory."""
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
