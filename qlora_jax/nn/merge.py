"""Folding adapters into the base: the two routes a QLoRA model can be merged by, and what each costs.

    merged_model, merged, report = merge_adapters(model, variables)                       # bf16
    merged_model, merged, report = merge_adapters(model, variables, requantize=QuantConfig())  # NF4 again

* **bf16** (``requantize=None``): every linear becomes a bf16 array; an adapted one
  ``dequant(W) + s B A`` (DoRA: times ``m / ||W + s B A||_row``), computed in float32 and rounded
  once. The model that comes out is transformers' ``merge_and_unload`` on a dequantized base.
* **NF4 again** (``requantize=QuantConfig(...)``): each adapted linear's float32 merge quantized
  again; the other linears keep their stored bytes. This is what PEFT warns about (and
  transformers#31293 reports): the adapter's update is mostly far below one NF4 step, so
  re-quantizing rounds much of it away.

``report`` has, per adapted tensor (checkpoint name), the error of the stored merge against the
float32 merge, which is exactly the unmerged model's weight: ``max_abs_err``, ``rel_fro_err``
(``||stored - merge|| / ||merge||``) and ``rel_update_err`` (``||stored - merge|| / ||s B A||``:
how much of the adapter's update the storage loses; above 1 it is lost entirely).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import traverse_util

from qlora_jax import quant
from qlora_jax.nn.llama import stack_experts, stack_layers, unstack_experts, unstack_layers
from qlora_jax.nn.lora import QuantConfig, dense_weight, float32_merge


def _merge_one(kernel, a, b, m, scale: float, requantize: QuantConfig | None, name: str):
    merged = float32_merge(kernel, a, b, scale, m)
    update = merged - dense_weight(kernel)  # s B A (DoRA: with the rows' rescaling)
    stored = merged.astype(jnp.bfloat16) if requantize is None else requantize.quantize(merged, name)
    err = dense_weight(stored) - merged
    tiny = jnp.finfo(jnp.float32).tiny
    stats = {
        "max_abs_err": float(jnp.max(jnp.abs(err))),
        "rel_fro_err": float(jnp.linalg.norm(err) / jnp.maximum(jnp.linalg.norm(merged), tiny)),
        "rel_update_err": float(jnp.linalg.norm(err) / jnp.maximum(jnp.linalg.norm(update), tiny)),
    }
    return stored, stats


def merge_adapters(model, variables: dict, *, requantize: QuantConfig | None = None):
    """``(model without LoRA, {"base": merged}, report)`` (module docstring). ``variables``: the
    model's ``params`` (adapters) and ``base``, scanned or unrolled layers, MoE experts included."""
    from qlora_jax.checkpoints.hf import hf_tensor_name  # the checkpoint's names, for the report

    lora = model.lora
    if lora is None or lora.rank == 0:
        raise ValueError("merge_adapters: this model has no adapters (model.lora is None or rank 0)")
    params = traverse_util.flatten_dict(unstack_experts(unstack_layers(variables["params"])))
    base = traverse_util.flatten_dict(unstack_experts(unstack_layers(variables["base"])))
    out, report = {}, {}
    for path, value in base.items():
        module = path[:-1]
        if path[-1] == "kernel" and (*module, "lora_a") in params:
            a, b = params[(*module, "lora_a")], params[(*module, "lora_b")]
            name = hf_tensor_name(path)
            out[path], report[name] = _merge_one(
                value, a, b, params.get((*module, "lora_magnitude")), lora.scale, requantize, name
            )
        elif path[-1] == "kernel" and requantize is None and path[0] != "lm_head" and quant.is_quantized(value):
            out[path] = dense_weight(value, jnp.bfloat16)  # the bf16 route: a bf16 model throughout
        else:
            out[path] = value
    merged = stack_experts(traverse_util.unflatten_dict(out))
    if model.scan_layers:
        merged = stack_layers(merged)
    return model.clone(lora=None), {"base": merged}, report
