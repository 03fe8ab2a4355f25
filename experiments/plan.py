r"""Will a QLoRA fine-tune fit? Print the per-device memory plan of :func:`qlora_jax.train.memory.plan`.

    python -m experiments.plan --model=llama-33b --device_memory=24GB
    python -m experiments.plan --model=/path/to/llama-2-7b-hf --device_memory=80GB --batch=8 --seq_len=1024
    python -m experiments.plan --model=llama-2-70b --mesh=fsdp=2 --shard_params --batch=2 --accum_steps=1

``--model`` is a preset (:data:`qlora_jax.nn.PRESETS`: LLaMA-1 7b-65b, LLaMA-2 7b/13b/70b) or an HF
``config.json``. ``--batch`` is global: with ``--mesh=fsdp=2`` one sequence per device is ``--batch=2``.

Defaults are the QLoRA recipe: NF4 + double quantization, LoRA r=64 on all seven linears in bf16,
paged AdamW updating 256 MiB of moments at a time (``configs/llama_alpaca.py``), batch 1, seq 512,
gradient checkpointing, bf16 compute. Runs in about a second on
a CPU (nothing is allocated).

Against the paper (arXiv 2305.14314), LLaMA-7B: it reports the 4-bit base as 5,048 MB and the
LoRA parameters as 26 MB (``--paper`` prints ours beside them). Our base: 3,341 MB of 4-bit
linears (4.127 bits/param) + 525 MB of bf16 embeddings and lm_head = 3,866 MB. The paper does not
state the setting of its figure; float32 embeddings and lm_head would add 525 MB, and we cannot
account for the remaining ~650 MB (CUDA context? quantization constants kept twice?). Its 26 MB
is "LoRA weights equivalent to 0.2 % of the original model weights" (13.5 M params in bf16), not
r=64 on all seven linears, which is 160 M params = 320 MB in bf16.
"""

from __future__ import annotations

import re

from absl import app, flags

from experiments.configs import tiny
from qlora_jax.nn import PRESETS, LoRAConfig, QuantConfig, model_config
from qlora_jax.nn.moe import MOE_DISPATCH
from qlora_jax.quant import bits_per_param
from qlora_jax.train import memory
from qlora_jax.train.validate import ConfigError, validate_config

PAPER_LLAMA7B_BASE_MB = 5048
PAPER_LLAMA7B_LORA_MB = 26
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20}
_UNITS |= {"gib": 2**30, "tib": 2**40}

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "llama-7b", f"HF config.json, a directory with one, or one of {sorted(PRESETS)}")
flags.DEFINE_string(
    "device_memory", "24GiB", "memory of one device: 24GiB (2^30), 24GB (10^9), 80e9; a '24 GB' GPU has 24 GiB"
)
flags.DEFINE_integer("batch", 1, "global micro-batch (sequences, over all devices of the mesh)")
flags.DEFINE_integer("seq_len", 512, "tokens per sequence")
flags.DEFINE_integer("accum_steps", 16, "gradient accumulation micro-batches (adds the gradient accumulator)")
flags.DEFINE_integer("rank", 64, "LoRA rank")
flags.DEFINE_list("targets", ["all"], "LoRA target linears; all: every linear of the model (LLaMA: 7, Phi-3: 4)")
flags.DEFINE_float("dropout", 0.1, "LoRA dropout (its masks cost activation memory)")
flags.DEFINE_enum("lora_dtype", "bfloat16", ["bfloat16", "float32"], "adapter parameter dtype")
flags.DEFINE_enum("quant", "nf4", ["nf4", "fp4", "int4", "none"], "storage of the linears (none: 16-bit LoRA)")
flags.DEFINE_integer("block_size", 64, "quantization block size")
flags.DEFINE_bool("double_quant", True, "double quantization of the absmax")
flags.DEFINE_bool("paged", True, "paged optimizer (state >= 1e5 elements in host memory)")
flags.DEFINE_enum("optimizer", "adamw", list(memory.OPTIMIZERS), "AdamW or 8-bit AdamW")
flags.DEFINE_bool("remat", True, "gradient checkpointing (nn.remat per decoder block)")
flags.DEFINE_enum("remat_policy", "nothing_saveable", list(memory.PLANNED_POLICIES),
                  "what a checkpointed block keeps (offload_linears: the linears' outputs in host memory)")  # fmt: skip
flags.DEFINE_enum(
    "moe_dispatch", "sorted", list(MOE_DISPATCH), "a MoE model's expert dispatch (dense: every expert on every token)"
)
flags.DEFINE_string("mesh", "data=1,fsdp=1", "device mesh, e.g. data=2,fsdp=4")
flags.DEFINE_string(
    "chunk_bytes", "256MiB", "paged(chunk_bytes=...), as config.train.paged_chunk_bytes; none = all state at once"
)
flags.DEFINE_bool("shard_params", False, "shard adapters, gradients and optimizer state over fsdp")
flags.DEFINE_bool("paper", False, "also print the LLaMA-7B base/LoRA figures beside the paper's")


def parse_bytes(text: str, flag: str = "device_memory") -> int:
    """``24GB`` (10^9), ``24GiB`` (2^30), ``80e9`` or ``512MiB`` -> bytes; ValueError naming ``flag``."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"--{flag}: cannot read {text!r} as a size; use e.g. 24GB, 24GiB, 80e9")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise ValueError(f"--{flag}: must be positive; got {text!r}")
    return int(value)


# The flags that are fine-tune config keys: the planner accepts exactly what training accepts.
FLAG_KEYS = {
    "batch": "train.batch_size", "accum_steps": "train.accum_steps", "rank": "lora.rank", "targets": "lora.targets",
    "dropout": "lora.dropout", "lora_dtype": "lora.dtype", "quant": "quant.type", "block_size": "quant.block_size",
    "double_quant": "quant.double_quant", "optimizer": "train.optimizer", "remat": "train.remat",
    "remat_policy": "train.remat_policy", "chunk_bytes": "train.paged_chunk_bytes",
    "moe_dispatch": "train.moe_dispatch",
}  # fmt: skip


def training_config(f, chunk_bytes: int | None, targets: tuple[str, ...]):
    """The fine-tune config (``configs/tiny.py`` with the flags' values) this plan is for, checked
    by :func:`qlora_jax.train.validate.validate_config`; a bad value is named by its flag. ``targets``:
    ``--targets`` with ``all`` resolved."""
    c = tiny.get_config()
    c.quant.enabled = f.quant != "none"
    c.train.paged_chunk_bytes = chunk_bytes or 0
    c.train.optimizer = ("paged_" if f.paged else "") + f.optimizer
    with c.ignore_type():  # the flags' own types; validate_config judges them
        if c.quant.enabled:
            c.quant.type = f.quant
        c.quant.block_size, c.quant.double_quant = f.block_size, f.double_quant
        c.lora.rank, c.lora.targets, c.lora.dropout, c.lora.dtype = f.rank, targets, f.dropout, f.lora_dtype
        c.train.batch_size, c.train.accum_steps, c.train.remat = f.batch, f.accum_steps, f.remat
        c.train.remat_policy, c.train.moe_dispatch = f.remat_policy, f.moe_dispatch
    try:
        validate_config(c)
    except ConfigError as e:
        flag = {v: k for k, v in FLAG_KEYS.items()}.get(e.key)
        if flag is None:
            raise
        raise ValueError(f"--{flag}: {e.message} (config.{e.key} of a fine-tune)") from None
    return c


def build_plan(argv_flags=None) -> memory.MemoryPlan:
    f = argv_flags or FLAGS
    if f.seq_len < 1:  # not a config key: the data's lengths set it in a fine-tune
        raise ValueError(f"--seq_len must be >= 1 (tokens per sequence); got {f.seq_len}")
    chunk_bytes = None if f.chunk_bytes.lower() == "none" else parse_bytes(f.chunk_bytes, "chunk_bytes")
    cfg = model_config(f.model)
    c = training_config(f, chunk_bytes, cfg.linear_names if f.targets == ["all"] else tuple(f.targets))
    quant = None
    if c.quant.enabled:
        quant = QuantConfig(c.quant.type, c.quant.block_size, c.quant.double_quant)
    lora = LoRAConfig(rank=c.lora.rank, targets=tuple(c.lora.targets), dropout=c.lora.dropout, dtype=c.lora.dtype)
    return memory.plan(
        cfg, quant, lora, batch=c.train.batch_size, seq_len=f.seq_len, mesh=f.mesh, paged=f.paged,
        remat=c.train.remat, remat_policy=c.train.remat_policy, accum_steps=c.train.accum_steps, optimizer=f.optimizer,
        shard_params=f.shard_params, moe_dispatch=c.train.moe_dispatch,
        chunk_bytes=chunk_bytes, device_memory=parse_bytes(f.device_memory),
    )  # fmt: skip


def paper_comparison() -> str:
    """Our LLaMA-7B base and adapter bytes beside the paper's figures (see the module docstring)."""
    p = memory.plan(model_config("llama-7b"))  # NF4+DQ, r=64 bf16 adapters
    params = p.adapters // 2  # bf16
    return "\n".join([
        f"NF4+DQ bits/param of a linear: {bits_per_param(64, True, 256):.4f} (paper: 4.127)",
        f"LLaMA-7B base: {p.frozen_quantized / 1e6:,.0f} MB 4-bit linears + {p.frozen_other / 1e6:,.0f} MB bf16 = "
        f"{(p.frozen_quantized + p.frozen_other) / 1e6:,.0f} MB (paper: {PAPER_LLAMA7B_BASE_MB:,} MB)",
        f"LLaMA-7B LoRA r=64, 7 linears: {params / 1e6:.1f} M params = {2 * params / 1e6:,.0f} MB bf16 "
        f"(paper: {PAPER_LLAMA7B_LORA_MB} MB for adapters of 0.2 % of the weights)",
    ])  # fmt: skip


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        p = build_plan()
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    print(f"model {FLAGS.model}: batch {FLAGS.batch} x seq {FLAGS.seq_len}, accum {FLAGS.accum_steps}, "
          f"quant {FLAGS.quant}{'+DQ' if FLAGS.double_quant and FLAGS.quant != 'none' else ''}, "
          f"LoRA r={FLAGS.rank} {FLAGS.lora_dtype}, {'paged ' if FLAGS.paged else ''}{FLAGS.optimizer}, "
          f"remat={FLAGS.remat} ({FLAGS.remat_policy}), mesh {FLAGS.mesh}, "
          f"chunk_bytes {FLAGS.chunk_bytes}")  # fmt: skip
    print(p.table())
    if FLAGS.paper:
        print(paper_comparison())


if __name__ == "__main__":
    app.run(main)
