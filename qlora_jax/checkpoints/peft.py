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
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from qlora_jax.nn.llama import stack_experts, stack_layers, unstack_experts, unstack_layers
from qlora_jax.nn.lora import LoRAConfig
from qlora_jax.nn.lora_init import convert_to_lora, is_residual_init
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
# how an adapter was made, once it is a plain LoRA on the base (converted CorDA / LoRA-GA, EVA's data-driven
# A) or which modules PEFT looked at (exclude_modules, layers_pattern without layers_to_transform): the
# file's tensors say what it computes
_DESCRIPTIVE = {"corda_config", "lora_ga_config", "eva_config", "exclude_modules", "layers_pattern",
                "ensure_weight_tying", "rank_pattern", "alpha_pattern"}  # fmt: skip
# what an adapter that did not start from a plain LoRA init needs: a base other than the checkpoint's
_RESIDUAL_INITS = {
    "pissa": "PiSSA's residual base (W minus its principal components)",
    "olora": "OLoRA's residual base (W minus Q R's rank-r part)",
    "corda": "CorDA's residual base",
    "loftq": "LoftQ's base (W minus its low-rank part, quantized)",
    "lora_ga": "LoRA-GA's residual base",
}
_PEFT_LEAVES = {"lora_A.weight": "lora_a", "lora_B.weight": "lora_b", "lora_magnitude_vector": "lora_magnitude"}
_NAME = re.compile(
    r"base_model\.model\.model\.layers\.(\d+)\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)"
)


def _adapted_modules(file: pathlib.Path) -> tuple[str, ...]:
    """The linears (last name component) an adapter file has tensors for, from its header."""
    if not file.is_file():
        raise FileNotFoundError(f"{file.parent}: no adapter_model.safetensors (PEFT's adapter weights)")
    try:
        with safe_open(file, "np") as f:
            names = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
    modules = {m.group(2).split(".")[-1] for m in map(_NAME.fullmatch, names) if m}
    if not modules:
        raise ValueError(f"{file}: holds no decoder linear's LoRA tensors")
    return tuple(sorted(modules))


def _lora_init(init, residual_base: bool) -> str:
    """PEFT's ``init_lora_weights`` as ``LoRAConfig.init`` (how the adapter began, for a residual base)."""
    if residual_base and isinstance(init, str) and is_residual_init(init.lower()):
        return init.lower()
    return "gaussian" if init == "gaussian" else "default"


def read_peft_config(adapter_dir, *, residual_base: bool = False) -> tuple[LoRAConfig, dict]:
    """``(LoRAConfig, raw dict)`` of a PEFT adapter directory's ``adapter_config.json``; a field
    that changes what the adapter computes and that we do not implement is refused by name.
    ``targets`` are the linears the file holds adapters of (whatever ``target_modules`` says: a
    list, dotted suffixes, a regex, names this model does not have)."""
    path = pathlib.Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (a PEFT adapter directory has it)")
    raw = json.loads(path.read_text())
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {raw.get('peft_type')!r}; only LORA adapters can be read")
    init = raw.get("init_lora_weights", True)
    kind = init.lower() if isinstance(init, str) else None  # PEFT reads "OLoRA" too
    kind = "pissa" if kind and kind.startswith("pissa") else kind
    if kind in _RESIDUAL_INITS and not residual_base:
        raise ValueError(
            f"{path}: init_lora_weights={init!r}: this adapter was trained on {_RESIDUAL_INITS[kind]}, not on the "
            "checkpoint's weights. Convert it to a plain LoRA adapter first (PEFT: save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)), which writes init_lora_weights=true"
        )
    if kind == "mica":  # B trained with A frozen: our adapters train both
        raise ValueError(f"{path}: init_lora_weights={init!r}: MiCA trains B alone, which our LoRA does not")
    r, alpha = raw.get("r"), raw.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, int | float):
        raise ValueError(
            f"{path}: r={r!r}, lora_alpha={alpha!r}: a LoRA adapter has an integer r >= 1 and a number alpha"
        )
    refused = {
        "bias": raw.get("bias") not in ("none", None),
        "fan_in_fan_out": bool(raw.get("fan_in_fan_out")),
        "loftq_config": bool(raw.get("loftq_config")),
        # one rank and alpha for every module: a pattern that repeats them changes nothing
        "rank_pattern": any(v != r for v in (raw.get("rank_pattern") or {}).values()),
        "alpha_pattern": any(v != alpha for v in (raw.get("alpha_pattern") or {}).values()),
    }
    refused |= {k: bool(v) for k, v in raw.items() if k not in _METADATA | _DESCRIPTIVE}  # modules_to_save, ...
    bad = sorted(k for k, on in refused.items() if on)
    if bad:
        raise ValueError(
            f"{path}: {', '.join(f'{k}={raw[k]!r}' for k in bad)}: not expressible as our LoRA (one rank, alpha and "
            "target set for every layer, adapters on the decoder linears only)"
        )
    lora = LoRAConfig(
        rank=r,
        alpha=float(alpha),
        dropout=float(raw.get("lora_dropout", 0.0)),
        targets=_adapted_modules(pathlib.Path(adapter_dir) / "adapter_model.safetensors"),
        use_rslora=bool(raw.get("use_rslora", False)),
        init=_lora_init(init, residual_base),
        use_dora=bool(raw.get("use_dora", False)),
    )
    return lora, raw


def load_peft_adapter(model, variables: dict, adapter_dir, *, dtype=jnp.float32, residual_base: bool = False):
    """``(model with the adapter's LoRA settings, variables with its adapters as "params")``.

    ``model``/``variables``: a checkpoint as :func:`qlora_jax.checkpoints.load_pretrained` loads it
    (with ``lora=None``: its ``base``; any ``params`` are replaced). ``adapter_dir`` holds
    ``adapter_model.safetensors`` and ``adapter_config.json`` as PEFT's ``save_pretrained`` writes
    them: any rank, alpha, rsLoRA, DoRA and target set over the model's linears (Phi-3's fused
    ones, MoE experts by their per-expert names). Refused by name: adapter settings we cannot express
    (:func:`read_peft_config`), a tensor of the file the model has no place for, a place with no
    tensor, a wrong shape, a non-finite value. ``dtype``: the adapter parameters' (float32 or
    bfloat16, ``LoRAConfig.dtype``). ``residual_base``: ``variables`` hold the residual base the
    adapter's init made (``load_pretrained`` with that ``lora.init``), so a PiSSA / OLoRA / LoftQ
    adapter saved unconverted is read too."""
    root = pathlib.Path(adapter_dir)
    lora, _ = read_peft_config(root, residual_base=residual_base)
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
    # a DoRA magnitude stays float32 (qlora_jax.nn.lora: a bf16 one would not train)
    cast = {p: jnp.asarray(x, jnp.float32 if p[-1] == "lora_magnitude" else dtype) for p, x in flat.items()}
    params = stack_experts(traverse_util.unflatten_dict(cast))
    if model.scan_layers:
        params = stack_layers(params)
    return adapted, {**variables, "params": params}
