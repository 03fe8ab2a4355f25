"""PEFT LoRA adapters in and out: :func:`load_peft_adapter` reads an adapter PEFT wrote,
:func:`export_peft_adapter` writes ours in the format PEFT loads.

PEFT's format (peft 0.21): ``adapter_model.safetensors`` with tensors named
``base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight`` (``lora_A``
``[r, in]``, ``lora_B`` ``[out, r]``; DoRA's magnitude ``...{module}.lora_magnitude_vector``
``[out]``; no adapter name) and ``adapter_config.json`` (LoraConfig).
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

import dataclasses
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from qlora_jax.nn.llama import stack_layers, stack_trees, unstack_experts, unstack_layers
from qlora_jax.nn.lora import LoRAConfig
from qlora_jax.nn.lora_init import convert_to_lora
from qlora_jax.nn.moe import is_expert_path


def peft_tensor_name(path: tuple[str, ...]) -> str:
    """``("layers_3", "self_attn", "q_proj", "lora_a")`` -> PEFT's tensor name (a MoE expert's:
    ``("layers_3", "mlp", "experts", "5", "gate_proj", "lora_a")``, :func:`unstack_experts`)."""
    layer, *modules, leaf = path
    kind = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}[leaf]
    return f"base_model.model.model.layers.{layer.split('_')[1]}.{'.'.join(modules)}.{kind}"


def export_peft_adapter(
    path, params: dict, lora: LoRAConfig, base_model_name_or_path: str | None, *, initial: dict | None = None
) -> None:
    """Write the adapters ``params`` (scanned or unrolled layers) as a PEFT adapter directory.

    An adapter from a residual init (``lora.init`` PiSSA, OLoRA, LoftQ) belongs on its residual
    base, and is written so (PEFT's ``init_lora_weights`` names the init). With ``initial``, the
    adapters as that init made them, it is written instead as PEFT converts it to a plain LoRA on
    the original weights (``path_initial_model_for_weight_conversion``): rank 2r,
    ``[A ; A0]``, ``[B | -B0]``, alpha doubled (rsLoRA: times sqrt 2), ``init_lora_weights: true``."""
    if initial is not None:
        params = convert_to_lora(params, initial)
        alpha = lora.alpha * (2**0.5 if lora.use_rslora else 2)
        lora = dataclasses.replace(lora, rank=2 * lora.rank, alpha=alpha, init="default")
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
        "init_lora_weights": {"default": True}.get(lora.init, lora.init),  # gaussian, pissa, olora, loftq
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": lora.use_dora,
    }
    (root / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


# adapter_config.json fields that describe the file, not what the adapter computes
_METADATA = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "megatron_core", "qalora_group_size", "lora_dropout", "init_lora_weights", "r", "lora_alpha",
    "target_modules", "use_rslora", "use_dora", "bias", "fan_in_fan_out", "loftq_config",
}  # fmt: skip
# what an adapter that did not start from a plain LoRA init needs: a base other than the checkpoint's
_RESIDUAL_INITS = {
    "pissa": "PiSSA's residual base (W minus its principal components)",
    "olora": "OLoRA's residual base (W minus Q R's rank-r part)",
    "corda": "CorDA's residual base",
    "loftq": "LoftQ's base (W minus its low-rank part, quantized)",
}
_PEFT_LEAVES = {"lora_A.weight": "lora_a", "lora_B.weight": "lora_b", "lora_magnitude_vector": "lora_magnitude"}
_NAME = re.compile(
    r"base_model\.model\.model\.layers\.(\d+)\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)"
)


def read_peft_config(adapter_dir) -> tuple[LoRAConfig, dict]:
    """``(LoRAConfig, raw dict)`` of a PEFT adapter directory's ``adapter_config.json``; a field
    that changes what the adapter computes and that we do not implement is refused by name.
    ``targets`` are PEFT's ``target_modules`` (a list; a regex string is resolved from the tensors
    by :func:`load_peft_adapter`)."""
    path = pathlib.Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (a PEFT adapter directory has it)")
    raw = json.loads(path.read_text())
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {raw.get('peft_type')!r}; only LORA adapters can be read")
    init = raw.get("init_lora_weights", True)
    kind = init.split("_")[0] if isinstance(init, str) else None
    if kind in _RESIDUAL_INITS:
        raise ValueError(
            f"{path}: init_lora_weights={init!r}: this adapter was trained on {_RESIDUAL_INITS[kind]}, not on the "
            "checkpoint's weights. Convert it to a plain LoRA adapter first (PEFT: save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)), which writes init_lora_weights=true"
        )
    refused = {
        "bias": raw.get("bias", "none") != "none",
        "fan_in_fan_out": bool(raw.get("fan_in_fan_out")),
        "loftq_config": bool(raw.get("loftq_config")),
    }
    refused |= {k: bool(v) for k, v in raw.items() if k not in _METADATA}  # rank_pattern, modules_to_save, ...
    bad = sorted(k for k, on in refused.items() if on)
    if bad:
        raise ValueError(
            f"{path}: {', '.join(f'{k}={raw[k]!r}' for k in bad)}: not expressible as our LoRA (one rank, alpha and "
            "target set for every layer, adapters on the decoder linears only)"
        )
    targets = raw.get("target_modules")
    lora = LoRAConfig(
        rank=int(raw["r"]),
        alpha=float(raw["lora_alpha"]),
        dropout=float(raw.get("lora_dropout", 0.0)),
        targets=tuple(sorted(targets)) if isinstance(targets, list) and targets else ("q_proj",),
        use_rslora=bool(raw.get("use_rslora", False)),
        init="gaussian" if init == "gaussian" else "default",
        use_dora=bool(raw.get("use_dora", False)),
    )
    return lora, raw


def _stack_experts(flat: dict) -> dict:
    """Per-expert leaves ``(..., "experts", "3", "gate_proj", "lora_a")`` -> one stacked ``[E, ...]``
    leaf per linear (:func:`qlora_jax.nn.llama.unstack_experts`'s inverse)."""
    out, groups = {}, {}
    for path, v in flat.items():
        if is_expert_path(path, stacked=False):
            *head, e, linear, leaf = path
            groups.setdefault((*head, linear, leaf), {})[int(e)] = v
        else:
            out[path] = v
    for path, by_expert in groups.items():
        n = max(by_expert) + 1
        missing = sorted(set(range(n)) - set(by_expert))
        if missing:
            *head, linear, leaf = path
            raise ValueError(f"adapter has no {leaf} for experts {missing} of {'.'.join(head)}.{linear}")
        out[path] = stack_trees([by_expert[e] for e in range(n)], what="experts")
    return out


def load_peft_adapter(model, variables: dict, adapter_dir, *, dtype=jnp.float32):
    """``(model with the adapter's LoRA settings, variables with its adapters as "params")``.

    ``model``/``variables``: a checkpoint as :func:`qlora_jax.checkpoints.load_pretrained` loads it
    (with ``lora=None``: its ``base``; any ``params`` are replaced). ``adapter_dir`` holds
    ``adapter_model.safetensors`` and ``adapter_config.json`` as PEFT's ``save_pretrained`` writes
    them: any rank, alpha, rsLoRA, DoRA and target set over the model's linears (Phi-3's fused
    ones, MoE experts by their per-expert names). Refused by name: adapter settings we cannot express
    (:func:`read_peft_config`), a tensor of the file the model has no place for, a place with no
    tensor, a wrong shape, a non-finite value. ``dtype``: the adapter parameters' (float32 or
    bfloat16, ``LoRAConfig.dtype``)."""
    root = pathlib.Path(adapter_dir)
    lora, raw = read_peft_config(root)
    file = root / "adapter_model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{root}: no adapter_model.safetensors (PEFT's adapter weights)")
    try:
        tensors = load_file(file)
    except SafetensorError as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
    flat, modules = {}, set()
    for name, x in tensors.items():
        m = _NAME.fullmatch(name)
        if m is None:
            raise ValueError(
                f"{file}: tensor {name!r} is not a decoder linear's LoRA A, B or DoRA magnitude "
                "(embedding, lm_head and bias adapters cannot be expressed)"
            )
        layer, module, kind = m.groups()
        flat[(f"layers_{layer}", *module.split("."), _PEFT_LEAVES[kind])] = x
        modules.add(module.split(".")[-1])
    cfg_targets = raw.get("target_modules")
    if isinstance(cfg_targets, list) and cfg_targets and set(cfg_targets) != modules:
        raise ValueError(f"{file}: holds adapters of {sorted(modules)}; its config's target_modules are "
                         f"{sorted(cfg_targets)}")  # fmt: skip
    lora = LoRAConfig(**{**lora.__dict__, "targets": tuple(sorted(modules)), "dtype": dtype})
    unknown = sorted(set(lora.targets) - set(model.config.linear_names))
    if unknown:
        raise ValueError(f"{file}: adapters on {unknown}, which are not linears of this {model.config.model_type} "
                         f"model (its linears: {model.config.linear_names})")  # fmt: skip
    adapted = model.clone(lora=lora)
    want = jax.eval_shape(adapted.clone(scan_layers=False).init, jax.random.key(0), jnp.ones((1, 1), jnp.int32))
    want = traverse_util.flatten_dict(want["params"])  # per-expert shapes, as the file names them
    want = traverse_util.flatten_dict(unstack_experts(traverse_util.unflatten_dict(
        {p: np.empty(x.shape, np.dtype(x.dtype)) if is_expert_path(p, stacked=True) else x for p, x in want.items()}
    )))  # fmt: skip
    missing = sorted(peft_tensor_name(p) for p in set(want) - set(flat))
    extra = sorted(peft_tensor_name(p) for p in set(flat) - set(want))
    if missing or extra:
        raise ValueError(f"{file}: " + "; ".join(
            f"{what} {names[:6]}{' ...' if len(names) > 6 else ''}"
            for what, names in (("missing", missing), ("not in this model", extra)) if names
        ))  # fmt: skip
    for path, x in flat.items():
        name = peft_tensor_name(path)
        if x.shape != want[path].shape:
            raise ValueError(f"{file}: tensor {name!r} has shape {list(x.shape)}; the model needs "
                             f"{list(want[path].shape)} (r={lora.rank})")  # fmt: skip
        if not np.isfinite(x).all():
            raise ValueError(f"{file}: tensor {name!r} has {int((~np.isfinite(x)).sum())} non-finite values")
    params = traverse_util.unflatten_dict(_stack_experts({p: jnp.asarray(x, dtype) for p, x in flat.items()}))
    if model.scan_layers:
        params = stack_layers(params)
    return adapted, {**variables, "params": params}
