"""What a fine-tune config may hold: one check of the whole config at the boundary.

``validate_config(config)`` is called by ``train_and_evaluate`` (so by ``experiments.finetune``
and the notebooks' runner) and by the planner (``experiments.plan``, whose flags map onto the
same keys), before anything is built. A value that would train wrong without a word
(``max_grad_norm=-1`` flips the gradient, ``eval_batches=0`` reports a loss of 0.0,
``lora.rank=0`` trains nothing) or crash deep inside the loop (``log_every=0``) is refused here,
naming the key and the allowed range. :data:`RESUMABLE` says which keys a resumed run may change.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping

from flax import traverse_util

from qlora_jax.checkpoints.gguf import resolve_model_path
from qlora_jax.data.chat import TRAIN_ON
from qlora_jax.data.jsonl import FORMATS
from qlora_jax.data.synthetic import FAMILIES
from qlora_jax.data.tokenizer import WHEEL_PREFIX
from qlora_jax.nn.llama import ALL_LINEAR_NAMES, ATTENTION, REMAT_POLICIES
from qlora_jax.nn.lora_init import is_residual_init
from qlora_jax.nn.moe import MOE_DISPATCH
from qlora_jax.parallel import MODES
from qlora_jax.quant import blockwise, codebooks

OPTIMIZERS = ("paged_adamw", "adamw", "paged_adamw_8bit", "adamw_8bit")
LR_SCHEDULES = ("constant", "cosine", "linear")
GGUF_DTYPES = ("", "f16", "bf16", "q8_0")  # export.gguf: "" = no GGUF export

# Keys a resumed run may change: they do not alter the model, the data or the optimizer, only how
# long it runs, what it logs and writes, and how it is laid out in memory. Every other key is the
# run's identity, and a change is refused on resume.
RESUMABLE = (
    "progress",
    "train.steps",
    "log_every",
    "eval_every",
    "eval_batches",
    "checkpoint_every",
    "num_generate",
    "export.*",
    "mesh.*",
    "sharding.*",
    "train.remat",
    "train.remat_policy",
    "train.attention",  # chunked and reference agree to float rounding
    "train.attention_chunk",
    "train.moe_dispatch",  # sorted and dense agree to float rounding
    "train.paged_min_size",
    "train.paged_chunk_bytes",
)


class ConfigError(ValueError):
    """A config value out of its allowed range; ``key`` is the dotted key (``train.batch_size``)."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"config.{key}{'' if message.startswith('=') else ' '}{message}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(lo: int, what: str = "") -> Callable:
    def check(v):
        if not _is_int(v) or v < lo:
            return f"must be an integer >= {lo}{what}"

    return check


def _float(lo: float, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = True, what: str = ""):
    lo_s = f"{'>' if lo_open else '>='} {lo:g}"
    hi_s = "" if hi is None else f" and {'<' if hi_open else '<='} {hi:g}"

    def check(v):
        if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
            return f"must be a number {lo_s}{hi_s}{what}"
        too_low = v <= lo if lo_open else v < lo
        too_high = hi is not None and (v >= hi if hi_open else v > hi)
        if too_low or too_high:
            return f"must be {lo_s}{hi_s}{what}"

    return check


def _finite_positive(what: str = ""):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
            return f"must be a finite number > 0{what}"

    return check


def _choice(options) -> Callable:
    def check(v):
        if v not in options:
            return f"must be one of {tuple(options)}"

    return check


def _bool(v):
    if not isinstance(v, bool):
        return "must be True or False"


def _str(v):
    if not isinstance(v, str):
        return "must be a string"


def _names(allowed: tuple[str, ...] | None, *, empty: bool) -> Callable:
    def check(v):
        if isinstance(v, str) or not isinstance(v, tuple | list) or not all(isinstance(x, str) and x for x in v):
            example = (allowed or ("layers.3.mlp.down_proj",))[0]
            return f"must be a tuple of names{f' from {allowed}' if allowed else ''}, e.g. ('{example}',)"
        if not empty and not v:
            return f"must name at least one of {allowed}"
        unknown = [x for x in v if allowed is not None and x not in allowed]
        if unknown:
            return f"names {unknown}, not among {allowed}"

    return check


def _lora_init(v):
    if not isinstance(v, str) or not (v in ("default", "gaussian") or is_residual_init(v)):
        return f"must be one of default, gaussian, pissa, pissa_niter_<k>, olora, loftq; got {v!r}"


def _mesh_axis(v):
    if not _is_int(v) or (v < 1 and v != -1):
        return "must be an integer >= 1, or -1 (the devices left over)"


RULES: dict[str, Callable] = {
    "seed": _int(0),
    "model_path": _str,
    "init_adapter": _str,
    "check_finite": _bool,
    "progress": _bool,
    "model.hidden_size": _int(1),
    "model.intermediate_size": _int(1),
    "model.num_hidden_layers": _int(1),
    "model.num_attention_heads": _int(1),
    "model.num_key_value_heads": _int(1),
    "model.max_position_embeddings": _int(1),
    "model.scan_layers": _bool,
    "quant.enabled": _bool,
    "quant.type": _choice(codebooks.QUANT_TYPES),
    "quant.block_size": _choice(blockwise.BLOCK_SIZES),
    "quant.double_quant": _bool,
    "quant.nested_block_size": _choice(blockwise.NESTED_BLOCK_SIZES),
    "quant.skip_modules": _names(None, empty=True),
    "quant.no_double_quant": _names(None, empty=True),
    "lora.rank": _int(0, " (0 only with train.trainable='full')"),
    "lora.alpha": _finite_positive(),
    "lora.dropout": _float(0.0, 1.0),
    "lora.targets": _names(ALL_LINEAR_NAMES, empty=False),
    "lora.use_rslora": _bool,
    "lora.use_dora": _bool,
    "lora.init": _lora_init,
    "lora.loftq_iter": _int(1),
    "lora.dtype": _choice(("float32", "bfloat16")),
    "data.kind": _choice(("synthetic", "jsonl")),
    "data.path": _str,
    "data.format": _choice(FORMATS),
    "data.families": _names(FAMILIES, empty=False),
    "data.num_train": _int(1),
    "data.num_eval": _int(1),
    "data.source_max_len": _int(0, " (tokens)"),
    "data.target_max_len": _int(1, " (tokens, the end-of-sequence token included)"),
    "data.train_on_source": _bool,
    "data.train_on": _choice(TRAIN_ON),
    "data.chat_template": _str,
    "data.packing": _bool,
    "data.group_by_length": _bool,
    "data.skip_malformed": _bool,
    "train.steps": _int(0, " (0: evaluate only)"),
    "train.batch_size": _int(1),
    "train.accum_steps": _int(1),
    "train.learning_rate": _finite_positive(),
    "train.warmup_ratio": _float(0.0, 1.0, hi_open=False, what=" (a fraction of train.steps)"),
    "train.lr_schedule": _choice(LR_SCHEDULES),
    "train.max_grad_norm": _float(0.0, lo_open=True, what=" (the clipping threshold; inf: no clipping)"),
    "train.weight_decay": _float(0.0, what=""),
    "train.adam_b2": _float(0.0, 1.0),
    "train.optimizer": _choice(OPTIMIZERS),
    "train.paged_min_size": _int(0, " (elements)"),
    "train.paged_chunk_bytes": _int(0, " (0: all paged state at once)"),
    "train.trainable": _choice(("lora", "full")),
    "train.dtype": _choice(("bfloat16", "float32", "float16")),
    "train.remat": _bool,
    "train.remat_policy": _choice(tuple(REMAT_POLICIES)),
    "train.attention": _choice(ATTENTION),
    "train.attention_chunk": _int(1, " (keys per step of chunked attention)"),
    "train.router_aux_loss_coef": _float(0.0, what=" (the load-balancing loss's weight; 0: off)"),
    "train.moe_dispatch": _choice(MOE_DISPATCH),
    "mesh.data": _mesh_axis,
    "mesh.fsdp": _mesh_axis,
    "sharding.params": _choice(MODES),
    "sharding.opt_state": _choice(MODES),
    "log_every": _int(1, " (steps)"),
    "eval_every": _int(1, " (steps)"),
    "eval_batches": _int(1, " (batches of train.batch_size)"),
    "checkpoint_every": _int(1, " (steps)"),
    "num_generate": _int(0),
    "export.merged": _bool,
    "export.quantized": _bool,
    "export.again": _bool,
    "export.gguf": _choice(GGUF_DTYPES),
}


def flatten(config) -> dict:
    """A ConfigDict (or nested mapping) as ``{"train.batch_size": 16, ...}``."""
    return traverse_util.flatten_dict(config.to_dict() if hasattr(config, "to_dict") else dict(config), sep=".")


def _cross_checks(c: dict) -> None:
    trainable = c["train.trainable"]
    if trainable == "lora" and c["lora.rank"] == 0:
        raise ConfigError("lora.rank", "must be >= 1 with train.trainable='lora' (rank 0 trains nothing)")
    if trainable == "full" and (c["quant.enabled"] or c["lora.rank"]):
        raise ConfigError(
            "train.trainable",
            "='full' trains the unquantized base itself: set config.quant.enabled=False and config.lora.rank=0 "
            f"(got quant.enabled={c['quant.enabled']}, lora.rank={c['lora.rank']})",
        )
    if not c["model_path"]:
        heads, kv = c["model.num_attention_heads"], c["model.num_key_value_heads"]
        if c["model.hidden_size"] % heads:
            raise ConfigError("model.hidden_size", f"must be a multiple of model.num_attention_heads={heads}")
        if heads % kv:
            raise ConfigError("model.num_attention_heads", f"must be a multiple of model.num_key_value_heads={kv}")
    elif c["model_path"].startswith(WHEEL_PREFIX):
        try:
            resolve_model_path(c["model_path"])
        except ValueError as e:
            raise ConfigError("model_path", str(e)) from None
    elif not os.path.exists(c["model_path"]):
        raise ConfigError("model_path", f"={c['model_path']!r}: no such checkpoint directory or .gguf file")
    if is_residual_init(c["lora.init"]) and not c["model_path"]:
        raise ConfigError("lora.init", f"={c['lora.init']!r} starts from a checkpoint's weights: set model_path")
    if c["lora.init"] == "loftq" and not c["quant.enabled"]:
        raise ConfigError("lora.init", "='loftq' initializes against a quantized base: needs quant.enabled=True")
    if is_residual_init(c["lora.init"]) and c["init_adapter"]:
        raise ConfigError("lora.init", f"={c['lora.init']!r} and init_adapter both initialize the adapters: pick one")
    if c["init_adapter"]:
        if trainable != "lora":
            raise ConfigError("init_adapter", f"starts LoRA adapters: needs train.trainable='lora' (got {trainable!r})")
        if not os.path.isfile(os.path.join(c["init_adapter"], "adapter_config.json")):
            raise ConfigError("init_adapter", f"={c['init_adapter']!r}: no PEFT adapter directory there "
                                              "(adapter_config.json + adapter_model.safetensors)")  # fmt: skip
    if c["data.kind"] == "jsonl":
        if not c["data.path"]:
            raise ConfigError("data.path", "is required with data.kind='jsonl' (a JSONL file)")
        if not os.path.isfile(c["data.path"]):
            raise ConfigError("data.path", f"={c['data.path']!r}: no such file")


def validate_config(config) -> None:
    """Check every key of a fine-tune config (the fields of ``experiments/configs/tiny.py``).

    Raises:
      ConfigError (a ValueError) naming the first bad key, its value and the allowed range; a
      missing or unknown key is an error too.
    """
    c = flatten(config)
    missing = sorted(k for k in RULES if k not in c)
    if missing:
        raise ConfigError(missing[0], f"is missing (all missing: {missing}; start from experiments/configs/tiny.py)")
    unknown = sorted(k for k in c if k not in RULES)
    if unknown:
        raise ConfigError(unknown[0], f"is not a known key (unknown: {unknown})")
    for key, rule in RULES.items():
        problem = rule(c[key])
        if problem:
            raise ConfigError(key, f"{problem}; got {c[key]!r}")
    _cross_checks(c)


def resumable(key: str) -> bool:
    """Whether a resumed run may change ``key`` (:data:`RESUMABLE`)."""
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in RESUMABLE)


# keys added after runs were saved, with the value that does what those runs did: absent from a
# saved config and set to this value, a key is no change
ADDED_KEYS = {"train.router_aux_loss_coef": 0.0, "init_adapter": "", "lora.use_dora": False, "lora.loftq_iter": 1}


def changed_keys(old: Mapping, new: Mapping) -> list[tuple[str, object, object]]:
    """``(key, old, new)`` for every flattened key whose value differs (absent: ``None``; absent
    from ``old`` and at its :data:`ADDED_KEYS` value: the same), sorted."""
    a, b = flatten(old), flatten(new)
    norm = {k: _plain(v) for k, v in a.items()}, {k: _plain(v) for k, v in b.items()}
    for k, v in ADDED_KEYS.items():
        if k not in norm[0] and norm[1].get(k) == v:
            norm[0][k] = v
    return [(k, norm[0].get(k), norm[1].get(k)) for k in sorted(set(a) | set(b)) if norm[0].get(k) != norm[1].get(k)]


def _plain(v):
    """Tuples and lists compare equal (a config read back from JSON holds lists)."""
    return list(v) if isinstance(v, tuple | list) else v
