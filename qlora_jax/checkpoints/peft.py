"""PEFT LoRA adapters out: the adapters of a trained model in the format HF PEFT loads.

PEFT's format (peft 0.21): ``adapter_model.safetensors`` with tensors named
``base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight`` (``lora_A``
``[r, in]``, ``lora_B`` ``[out, r]``; no adapter name) and ``adapter_config.json`` (LoraConfig).
A MoE expert's adapters are written per expert, ``...mlp.experts.{e}.gate_proj.lora_A.weight``
(Mixtral: ``block_sparse_moe.experts.{e}.w1``), as PEFT names them on transformers 4's experts;
PEFT 0.21 on transformers 5 converts them to its fused ``target_parameters`` form as it loads
(Mixtral and Qwen3-MoE measured: logits equal ours to 1e-6). Their ``lora_dropout`` is written as 0:
that form refuses any other ("ParamWrapper does not work with lora_dropout != 0"), and dropout
does not change what a trained adapter computes. PEFT 0.21 does not convert ``qwen2_moe`` itself
(transformers 5.24 maps only its derivatives to a conversion): it loads such an adapter's
attention and shared-expert parts and silently drops the experts'.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from qlora_jax.nn.llama import unstack_experts, unstack_layers
from qlora_jax.nn.lora import LoRAConfig
from qlora_jax.nn.moe import is_expert_path


def peft_tensor_name(path: tuple[str, ...]) -> str:
    """``("layers_3", "self_attn", "q_proj", "lora_a")`` -> PEFT's tensor name (a MoE expert's:
    ``("layers_3", "mlp", "experts", "5", "gate_proj", "lora_a")``, :func:`unstack_experts`)."""
    layer, *modules, leaf = path
    kind = {"lora_a": "lora_A", "lora_b": "lora_B"}[leaf]
    return f"base_model.model.model.layers.{layer.split('_')[1]}.{'.'.join(modules)}.{kind}.weight"


def export_peft_adapter(path, params: dict, lora: LoRAConfig, base_model_name_or_path: str | None) -> None:
    """Write the adapters ``params`` (scanned or unrolled layers) as a PEFT adapter directory."""
    root = pathlib.Path(path)
    root.mkdir(parents=True, exist_ok=True)
    flat = traverse_util.flatten_dict(unstack_experts(unstack_layers(params)))
    tensors = {peft_tensor_name(p): np.asarray(jax.device_get(v), np.float32) for p, v in flat.items()}
    experts = any(is_expert_path(p, stacked=False) for p in flat)
    save_file(tensors, str(root / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0 if experts else lora.dropout,
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
