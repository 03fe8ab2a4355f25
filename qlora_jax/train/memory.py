"""Byte accounting and the "will it fit" planner for QLoRA fine-tuning.

:func:`plan` answers, before anything is allocated, how many bytes one device needs to train a
model with this repo's train step (``qlora_jax.train.steps.make_train_step``), by component:

* **frozen base, quantized** — exact: the :class:`~qlora_jax.quant.QuantizedTensor` layout
  (:func:`quantized_nbytes`) of every linear of every decoder block;
* **frozen base, other** — exact: embeddings, ``lm_head`` (unless tied), norms and biases, stored
  in the compute dtype (``LlamaForCausalLM`` initializes and ``load_pretrained`` loads them so);
* **adapters** — exact: ``lora_a [r, in]`` and ``lora_b [out, r]`` of each target, in
  ``LoRAConfig.dtype``;
* **gradients** — the adapter-shaped gradient of one micro-batch, plus the accumulator the
  step's ``lax.scan`` carries when ``accum_steps > 1``;
* **optimizer state** — exact, by memory kind: AdamW keeps ``mu`` and ``nu`` in float32 whatever
  the adapters' dtype (``optim.float32_moments``, as bitsandbytes' "32-bit" paged AdamW does),
  8-bit AdamW its codes and block absmax (``optim/adam8bit.py``);
  :func:`~qlora_jax.optim.paged` moves per-parameter leaves of ``>= min_size`` elements to host;
* **activations** — an estimate for the remat policy (see :func:`activation_bytes`);
* **optimizer update** — paged state is brought to the device for the update, all of it at once
  with the default ``chunk_bytes=None``; the update runs after the backward pass, so the peak is
  ``max(backward, update)`` transients on top of what stays resident.

The frozen and adapter layouts are derived by the same rules the model uses and are tested equal
to ``jax.eval_shape(model.init, ...)`` (:func:`abstract_variables`), which also works for a 65B
model (abstract, ~7 s on a CPU).

Validation (``tests/test_memory.py``): the planner's device total against
``argument + output - alias + temp`` of the compiled step's ``memory_analysis()`` — on an H100,
LLaMA-7B shapes with 4 of 32 blocks, batch 1 x 512, r=64 bf16 adapters, NF4+DQ: remat +2.1 %
(8 blocks +1.8 %), no remat +6.2 %, paged + 16 accumulation steps +0.8 %; on the CPU, five small
configurations within 10 %. XLA's choices differ between backends (``backend=``) and are not
promises: the estimate is for this code and jax 0.11.2.

Sharding (``mesh={"data": d, "fsdp": f}``): the frozen base is split over ``fsdp`` where the
split is block-aligned (:func:`quantized_nbytes_per_device`), otherwise replicated; adapters,
gradients and optimizer state are replicated unless ``shard_params=True``; activations are for
the per-device batch ``batch / (d * f)``; with ``f > 1`` one decoder block's frozen weights are
gathered at a time, so the largest block's replicated bytes are added.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax import parallel
from qlora_jax.nn.llama import LINEAR_NAMES, LlamaConfig, LlamaForCausalLM
from qlora_jax.nn.lora import LoRAConfig, QuantConfig
from qlora_jax.quant import blockwise

KiB, MiB, GiB = 2**10, 2**20, 2**30
# What a device cannot give to arrays: the CUDA context, cuBLAS/cuDNN workspaces and allocator
# fragmentation. An allowance, not a measurement: 1 GiB + 5 % of the device. Note that JAX
# preallocates only 75 % of a GPU by default: set XLA_PYTHON_CLIENT_MEM_FRACTION=.95 (or
# XLA_PYTHON_CLIENT_PREALLOCATE=false) for plans near the limit.
RESERVE_BYTES = 1 * GiB
RESERVE_FRACTION = 0.05
PAGED_MIN_SIZE = 100_000  # qlora_jax.optim.paged's default min_size (bitsandbytes' 1e5)
ADAM8BIT_MIN_SIZE = 4096  # qlora_jax.optim.adam8bit's default min_8bit_size
ADAM8BIT_BLOCK = 256
OPTIMIZERS = ("adamw", "adamw_8bit")


# --- exact layouts -----------------------------------------------------------------------------


def _itemsize(dtype) -> int:
    return int(jnp.dtype(dtype).itemsize)


def _quantized_leaf_sizes(n: int, quant: QuantConfig) -> dict[str, int]:
    """Bytes of each QuantizedTensor leaf for ``n`` elements (``tensor.py``'s layout)."""
    nb = blockwise.num_blocks(n, quant.block_size)
    out = {"packed": (n + 1) // 2}
    if quant.double_quant:
        out["absmax"] = nb  # uint8 codes
        out["nested_absmax"] = 4 * blockwise.num_blocks(nb, quant.nested_block_size)
        out["offset"] = 4
    else:
        out["absmax"] = 4 * nb
    return out


def quantized_nbytes(shape: tuple[int, ...], quant: QuantConfig) -> int:
    """``QuantConfig.quantize(w).nbytes`` for a ``w`` of ``shape``, without allocating anything.

    Packed codes ``ceil(n / 2)`` bytes; absmax float32 per ``block_size`` block, or with double
    quantization a uint8 code per block plus float32 ``nested_absmax`` per ``nested_block_size``
    blocks and a float32 offset. Partial last blocks count as whole blocks.
    """
    return sum(_quantized_leaf_sizes(int(np.prod(shape, dtype=np.int64)), quant).values())


def quantized_nbytes_per_device(shape: tuple[int, int], quant: QuantConfig, fsdp: int) -> int:
    """Bytes of an ``[out, in]`` QuantizedTensor on one of ``fsdp`` devices.

    :func:`qlora_jax.parallel.quantized_splits` decides, as it does for the training mesh: split
    into whole rows, blocks and nested blocks (the offset replicated), or replicated whole.
    """
    sizes = _quantized_leaf_sizes(int(np.prod(shape, dtype=np.int64)), quant)
    nested = quant.nested_block_size if quant.double_quant else None
    if not parallel.quantized_splits(tuple(shape), quant.block_size, nested, fsdp):
        return sum(sizes.values())
    return sum(v if k == "offset" else v // fsdp for k, v in sizes.items())


def array_nbytes_per_device(shape: tuple[int, ...], itemsize: int, fsdp: int) -> int:
    """A plain array on one of ``fsdp`` devices: its largest dim divisible by ``fsdp`` is split."""
    n = int(np.prod(shape, dtype=np.int64)) * itemsize
    if fsdp > 1 and any(d % fsdp == 0 for d in shape):
        return n // fsdp
    return n


def linear_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, int]]:
    """``[out, in]`` of the seven linears of one decoder block (``llama.py``: GQA head dims)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.dim_head, cfg.num_key_value_heads * cfg.dim_head
    return {
        "q_proj": (q, d),
        "k_proj": (kv, d),
        "v_proj": (kv, d),
        "o_proj": (d, q),
        "gate_proj": (f, d),
        "up_proj": (f, d),
        "down_proj": (d, f),
    }


def bias_shapes(cfg: LlamaConfig) -> dict[str, tuple[int]]:
    """Frozen biases of one block: q/k/v (Qwen2 or ``attention_bias``), o (``attention_bias``), MLP."""
    lin = linear_shapes(cfg)
    names = []
    if cfg.attention_bias or cfg.qkv_bias:
        names += ["q_proj", "k_proj", "v_proj"]
    if cfg.attention_bias:
        names.append("o_proj")
    if cfg.mlp_bias:
        names += ["gate_proj", "up_proj", "down_proj"]
    return {n: (lin[n][0],) for n in names}


def lora_shapes(cfg: LlamaConfig, lora: LoRAConfig | None, scan_layers: bool = True) -> list[tuple[int, ...]]:
    """Every adapter leaf of the model: ``lora_a [r, in]`` and ``lora_b [out, r]`` per target, per
    layer; with ``scan_layers`` (the model's default) one ``[L, r, in]`` / ``[L, out, r]`` leaf per
    target, which is what paging's ``min_size`` and 8-bit Adam's blocks see."""
    if lora is None or lora.rank == 0:
        return []
    unknown = sorted(set(lora.targets) - set(LINEAR_NAMES))
    if unknown:
        raise ValueError(f"LoRA targets {unknown} name no linear of this model; known: {LINEAR_NAMES}")
    targets = [(lora.rank, i, o) for name, (o, i) in linear_shapes(cfg).items() if name in lora.targets]
    if scan_layers:
        return [s for r, i, o in targets for s in ((cfg.num_hidden_layers, r, i), (cfg.num_hidden_layers, o, r))]
    return [s for _ in range(cfg.num_hidden_layers) for r, i, o in targets for s in ((r, i), (o, r))]


@dataclasses.dataclass(frozen=True)
class FrozenBytes:
    """Per-device frozen bytes: quantized linears, everything else, and one block's gathered copy."""

    quantized: int
    other: int
    gathered_block: int  # with fsdp > 1: the largest block's full (unsharded) frozen bytes


def frozen_bytes(cfg: LlamaConfig, quant: QuantConfig | None, dtype=jnp.bfloat16, fsdp: int = 1) -> FrozenBytes:
    """Frozen variables of ``LlamaForCausalLM(cfg, quant=quant, dtype=dtype)``, per device."""
    c = _itemsize(dtype)
    qbytes = other = block_full = 0
    for shape in linear_shapes(cfg).values():
        if quant is not None:
            qbytes += quantized_nbytes_per_device(shape, quant, fsdp)
            block_full += quantized_nbytes(shape, quant)
        else:
            other += array_nbytes_per_device(shape, c, fsdp)
            block_full += int(np.prod(shape)) * c
    for shape in [*bias_shapes(cfg).values(), (cfg.hidden_size,), (cfg.hidden_size,)]:  # + 2 norms
        other += array_nbytes_per_device(shape, c, fsdp)
        block_full += int(np.prod(shape)) * c
    layers = cfg.num_hidden_layers
    vd = (cfg.vocab_size, cfg.hidden_size)
    top = array_nbytes_per_device(vd, c, fsdp) * (1 if cfg.tie_word_embeddings else 2)
    top += array_nbytes_per_device((cfg.hidden_size,), c, fsdp)  # final norm
    return FrozenBytes(qbytes * layers, other * layers + top, block_full if fsdp > 1 else 0)


def optimizer_state_bytes(
    shapes: list[tuple[int, ...]],
    optimizer: str = "adamw",
    paged: bool = True,
    min_size: int = PAGED_MIN_SIZE,
    schedule: bool = True,
) -> dict[str, int]:
    """Optimizer-state bytes by memory kind (``device``, ``pinned_host``) for params of ``shapes``.

    The state of ``train_lib.build_optimizer``: ``chain(clip_by_global_norm, adamw)`` or the
    8-bit variant, optionally ``paged``. AdamW: ``mu``, ``nu`` in float32 + an int32
    count (+ the schedule's int32 count). 8-bit: per parameter of >= 4096 elements uint8 ``mu``
    and ``nu`` codes (param-shaped, so pageable) and float32 absmax per 256 (not param-shaped, so
    never paged); smaller parameters keep float32 moments and empty absmax.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {optimizer!r}")
    out = {"device": 4 + (4 if schedule else 0), "pinned_host": 0}
    for shape in shapes:
        n = int(np.prod(shape, dtype=np.int64))
        if optimizer == "adamw":
            moment, extra = 4 * n, 0  # float32 whatever the adapters' dtype (optim.float32_moments)
        elif n < ADAM8BIT_MIN_SIZE:
            moment, extra = 4 * n, 0
        else:
            moment, extra = n, 2 * 4 * blockwise.num_blocks(n, ADAM8BIT_BLOCK)
        kind = "pinned_host" if paged and n >= min_size else "device"
        out[kind] += 2 * moment
        out["device"] += extra
    if not out["pinned_host"]:
        del out["pinned_host"]
    return out


# --- activations ---------------------------------------------------------------------------------


def activation_bytes(
    cfg: LlamaConfig,
    lora: LoRAConfig | None,
    quant: QuantConfig | None,
    batch: int,
    seq_len: int,
    remat: bool,
    dtype=jnp.bfloat16,
    backend: str = "gpu",
) -> dict[str, int]:
    """Estimated activation bytes of one micro-batch's forward + backward, per device.

    Counted from what ``nn/llama.py`` computes for ``N = batch * seq_len`` tokens and what
    reverse-mode autodiff keeps for the backward pass (``c`` = compute dtype bytes), then checked
    against XLA's buffer assignment (``memory_analysis``) on CPU and on an H100:

    * ``per_token`` of one decoder block: the block input and the two norm outputs (``3cD``) and
      their float32 upcasts (``8D``); q, k, v and the attention output (``c(2q + 2kv)``) and
      roped q/k in float32 (``4(q + kv)``); attention scores and softmax in float32 and the
      probabilities in ``c`` (``(8 + c) H T`` — the ``[B, H, T, T]`` terms); gate, up and the
      SwiGLU product in ``c`` and float32 (``(3c + 12) F``); the adapters' rank-``r``
      intermediates (``2cr`` per target).
    * ``dequantized``: at training sizes ``qmatmul`` runs a dequantize + GEMM path, dequantizing each
      4-bit weight to ``c`` for an XLA GEMM (``pallas_dequant``; the CPU's ``xla`` path alike).
      Without remat, XLA merges the forward's and the backward's dequantize (CSE), so every
      block keeps its dequantized weights; with remat, one block's at a time.
    * remat=False saves ``per_token * N`` (+ the dequantized weights) per block; remat=True saves
      each block's input (``cDN``) and recomputes one block at a time (``working``).
    * LoRA dropout draws uint32 random bits over each target's input. XLA:CPU keeps them (twice:
      forward and recompute) for every block, even under remat; XLA:GPU fuses them into the mask
      and keeps one block's two bool masks.
    * Unquantized linears (16-bit LoRA) on XLA:CPU also keep their float32 GEMM outputs
      (``4 * out`` per token; measured — the quantized path is a ``custom_vjp`` that saves none).
    * The head: float32 logits, log-softmax and its cotangent (``3 * 4 V`` per token). It is
      alive before the blocks' backward pass, so it overlaps with ``working`` (max of the two).

    Returns:
      ``saved`` (all blocks), ``dropout`` (what dropout keeps), ``working`` (max of head and one
      recomputed block), ``dequantized`` (one block's dequantized weights, with remat) — to add.
    """
    if backend not in ("gpu", "cpu"):
        raise ValueError(f"backend must be 'gpu' or 'cpu'; got {backend!r}")
    n = batch * seq_len
    c = _itemsize(dtype)
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    q, kv = h * cfg.dim_head, cfg.num_key_value_heads * cfg.dim_head
    r = lora.rank if lora is not None else 0
    targets = [t for t in LINEAR_NAMES if lora is not None and r > 0 and t in lora.targets]
    per_token = (
        3 * c * d
        + 8 * d
        + c * (2 * q + 2 * kv)
        + 4 * (q + kv)
        + (8 + c) * h * seq_len
        + (3 * c + 12) * f
        + 2 * c * r * len(targets)
    )
    shapes = linear_shapes(cfg)
    if quant is None and backend == "cpu":  # unquantized linears keep their float32 GEMM outputs
        per_token += 4 * sum(o for o, _ in shapes.values())
    block_weights = sum(int(np.prod(s)) for s in shapes.values()) * c if quant is not None else 0
    layers = cfg.num_hidden_layers
    dropout_inputs = n * sum(shapes[t][1] for t in targets) if lora is not None and lora.dropout > 0 else 0
    if backend == "cpu":
        dropout = 2 * 4 * dropout_inputs * layers
    else:
        dropout = 2 * dropout_inputs * (1 if remat else layers)
    head = 3 * 4 * cfg.vocab_size * n
    if remat:
        return {
            "saved": c * d * n * layers,
            "dropout": dropout,
            "working": max(head, per_token * n),
            "dequantized": block_weights,
        }
    return {"saved": (per_token * n + block_weights) * layers, "dropout": dropout, "working": head, "dequantized": 0}


# --- the plan ----------------------------------------------------------------------------------


def _fmt(n: int) -> str:
    return f"{n / GiB:8.2f} GiB" if n >= GiB else f"{n / MiB:8.1f} MiB"


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device by component (see :func:`plan`); ``device_bytes`` is the step's peak.

    ``rows`` keeps the components in table order as ``(name, bytes, memory kind, note)``.
    """

    frozen_quantized: int
    frozen_other: int
    gathered_block: int
    adapters: int
    grads: int
    optimizer_device: int
    optimizer_host: int
    activations: dict[str, int]
    update_extra: int
    batch_bytes: int
    device_memory: int | None
    notes: tuple[str, ...] = ()

    @property
    def activation_total(self) -> int:
        return sum(self.activations.values())

    @property
    def device_bytes(self) -> int:
        return (
            self.frozen_quantized
            + self.frozen_other
            + self.gathered_block
            + self.adapters
            + self.grads
            + self.optimizer_device
            + self.activation_total
            + self.update_extra
            + self.batch_bytes
        )

    @property
    def host_bytes(self) -> int:
        return self.optimizer_host

    @property
    def reserve(self) -> int:
        """Bytes of the device held back: ``RESERVE_BYTES + RESERVE_FRACTION * device_memory``."""
        return 0 if self.device_memory is None else RESERVE_BYTES + int(RESERVE_FRACTION * self.device_memory)

    @property
    def usable(self) -> int | None:
        return None if self.device_memory is None else self.device_memory - self.reserve

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.device_bytes <= self.usable

    @property
    def rows(self) -> list[tuple[str, int, str, str]]:
        a = self.activations
        return [
            ("frozen base, 4-bit linears", self.frozen_quantized, "device", "exact: QuantizedTensor layout"),
            ("frozen base, unquantized", self.frozen_other, "device", "exact: embed, lm_head, norms, biases"),
            ("gathered block (fsdp)", self.gathered_block, "device", "one block's frozen weights, unsharded"),
            ("LoRA adapters", self.adapters, "device", "exact"),
            ("gradients", self.grads, "device", "per micro-batch + scan accumulator"),
            ("optimizer state", self.optimizer_device, "device", "exact"),
            ("optimizer state (paged)", self.optimizer_host, "host", "exact; on device only during the update"),
            ("activations: saved", a["saved"], "device", "estimate"),
            ("activations: dropout", a["dropout"], "device", "estimate"),
            ("activations: working", a["working"], "device", "estimate: max(head, one block)"),
            ("activations: dequantized", a["dequantized"], "device", "one block's weights in compute dtype"),
            ("optimizer update extra", self.update_extra, "device", "paged moments fetched, beyond backward"),
            ("batch", self.batch_bytes, "device", "exact"),
        ]

    def table(self) -> str:
        lines = [f"{'component':<28} {'bytes':>12}  {'kind':<7} note", "-" * 96]
        for name, n, kind, note in self.rows:
            if n:
                lines.append(f"{name:<28} {_fmt(n)}  {kind:<7} {note}")
        lines.append("-" * 96)
        lines.append(f"{'device total (peak)':<28} {_fmt(self.device_bytes)}")
        lines.append(f"{'host total':<28} {_fmt(self.host_bytes)}")
        if self.device_memory is not None:
            lines.append(
                f"{'device memory':<28} {_fmt(self.device_memory)}  usable {_fmt(self.usable).strip()} "
                f"(reserve {_fmt(self.reserve).strip()} = {RESERVE_BYTES // MiB} MiB + {RESERVE_FRACTION:.0%})"
            )
            margin = self.usable - self.device_bytes
            verdict = "fits" if self.fits else "does not fit"
            lines.append(f"verdict: {verdict} ({'headroom' if self.fits else 'short by'} {_fmt(abs(margin)).strip()})")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def parse_mesh(mesh: Mapping[str, int] | str | None) -> dict[str, int]:
    """``{"data": d, "fsdp": f}`` from a dict or ``"data=2,fsdp=4"``; missing axes are 1."""
    if mesh is None:
        return {"data": 1, "fsdp": 1}
    if isinstance(mesh, str):
        out = {}
        for part in filter(None, (p.strip() for p in mesh.split(","))):
            name, sep, value = part.partition("=")
            if not sep or not value.strip().isdigit():
                raise ValueError(f"mesh: expected 'axis=size' pairs like 'data=1,fsdp=4'; got {part!r}")
            out[name.strip()] = int(value)
        mesh = out
    unknown = sorted(set(mesh) - {"data", "fsdp"})
    if unknown:
        raise ValueError(f"mesh axes must be 'data' and 'fsdp'; got {unknown}")
    out = {"data": int(mesh.get("data", 1)), "fsdp": int(mesh.get("fsdp", 1))}
    if min(out.values()) < 1:
        raise ValueError(f"mesh axis sizes must be >= 1; got {out}")
    return out


def plan(
    model_config: LlamaConfig,
    quant: QuantConfig | None = QuantConfig(),
    lora: LoRAConfig | None = LoRAConfig(dtype=jnp.bfloat16),
    batch: int = 1,
    seq_len: int = 512,
    mesh: Mapping[str, int] | str | None = None,
    paged: bool = True,
    remat: bool = True,
    *,
    accum_steps: int = 1,
    optimizer: str = "adamw",
    min_size: int = PAGED_MIN_SIZE,
    shard_params: bool = False,
    scan_layers: bool = True,
    chunk_bytes: int | None = None,
    dtype=jnp.bfloat16,
    device_memory: int | None = None,
    backend: str = "gpu",
) -> MemoryPlan:
    """Bytes per device to run this repo's train step, by component, and whether it fits.

    Args:
      model_config: the architecture.
      quant: storage of the decoder linears (None: 16-bit LoRA, linears in ``dtype``).
      lora: the adapters. The default is the QLoRA recipe's (r=64, alpha=16, all seven
        linears) with **bf16** adapter parameters, as the QLoRA script keeps them when training
        in bf16 (``LoRAConfig``'s own default is float32: twice the adapter, gradient and
        optimizer bytes).
      batch: global micro-batch (sequences per step and micro-batch, over all devices).
      seq_len: tokens per sequence.
      mesh: ``{"data": d, "fsdp": f}`` (or ``"data=d,fsdp=f"``); ``batch`` must divide by
        ``d * f``.
      paged: optimizer state of ``>= min_size`` elements per leaf lives in host memory.
      remat: ``nn.remat`` per decoder block (policy ``nothing_saveable``).
      accum_steps: micro-batches per step; the step's scan carries a gradient accumulator.
      optimizer: ``"adamw"`` or ``"adamw_8bit"``.
      min_size: :func:`~qlora_jax.optim.paged`'s ``min_size``.
      shard_params: adapters, gradients and optimizer state sharded over ``fsdp`` too.
      scan_layers: the model's layer layout (:class:`~qlora_jax.nn.LlamaForCausalLM`): stacked
        adapter leaves are ``L`` times larger, so paging's ``min_size`` sees them differently.
      chunk_bytes: :func:`~qlora_jax.optim.paged`'s ``chunk_bytes``: paged state brought to the
        device at once for the update (None, its default: all of it — which costs two copies
        of the paged state on the device during the update).
      dtype: compute dtype (embeddings, norms, lm_head are stored in it).
      device_memory: bytes of one device, for the verdict (None: no verdict).
      backend: ``"gpu"`` (the target) or ``"cpu"`` (XLA:CPU keeps dropout's random bits; used
        to validate against CPU compiles in the tests).

    Returns:
      A :class:`MemoryPlan`; ``print(plan(...))`` shows the table and verdict.
    """
    m = parse_mesh(mesh)
    devices = m["data"] * m["fsdp"]
    if batch < 1 or seq_len < 1 or accum_steps < 1:
        raise ValueError(f"batch, seq_len and accum_steps must be >= 1; got {batch}, {seq_len}, {accum_steps}")
    if batch % devices:
        raise ValueError(f"batch={batch} does not divide over the mesh's data x fsdp = {devices} devices (batch, mesh)")
    fsdp = m["fsdp"]
    frozen = frozen_bytes(model_config, quant, dtype, fsdp)
    shapes = lora_shapes(model_config, lora, scan_layers)
    ldtype = lora.dtype if lora is not None else jnp.float32
    param_fsdp = fsdp if shard_params else 1
    adapters = sum(array_nbytes_per_device(s, _itemsize(ldtype), param_fsdp) for s in shapes)
    grads = adapters * (2 if accum_steps > 1 else 1)
    opt = optimizer_state_bytes(shapes, optimizer, paged, min_size)
    opt_host = opt.get("pinned_host", 0) // param_fsdp
    opt_device = opt["device"] // param_fsdp if shard_params else opt["device"]
    acts = activation_bytes(model_config, lora, quant, batch // devices, seq_len, remat, dtype, backend)
    backward = sum(acts.values()) + frozen.gathered_block
    # the update runs after the backward pass: paged moments come to the device (all at once
    # with chunk_bytes=None, else the largest chunk) and new ones are written before going back.
    fetched = opt_host
    if chunk_bytes is not None and opt_host:
        per_param = [2 * n * (1 if optimizer == "adamw_8bit" else 4) for n in map(np.prod, shapes)]
        largest = max(b for b, n in zip(per_param, map(np.prod, shapes), strict=True) if n >= min_size)
        fetched = min(opt_host, max(chunk_bytes, largest // param_fsdp))
    update_extra = max(0, 2 * fetched - backward)
    batch_bytes = accum_steps * (batch // devices) * seq_len * (4 + 1 + 1)
    notes = []
    if opt_host:
        notes.append(f"paged: state leaves >= {min_size:,} elements live in pinned host memory between steps")
    return MemoryPlan(
        frozen_quantized=frozen.quantized,
        frozen_other=frozen.other,
        gathered_block=frozen.gathered_block,
        adapters=adapters,
        grads=grads,
        optimizer_device=opt_device,
        optimizer_host=opt_host,
        activations=acts,
        update_extra=update_extra,
        batch_bytes=batch_bytes,
        device_memory=device_memory,
        notes=tuple(notes),
    )


# --- the real step, for validation ----------------------------------------------------------------


def abstract_variables(
    cfg: LlamaConfig, quant: QuantConfig | None, lora: LoRAConfig | None, dtype=jnp.bfloat16
) -> dict:
    """``jax.eval_shape(model.init, ...)``: the model's variables as ShapeDtypeStructs (no allocation)."""
    model = LlamaForCausalLM(cfg, lora=lora, quant=quant, dtype=dtype)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))


def tree_nbytes(tree) -> int:
    """Bytes of the arrays (or ShapeDtypeStructs) of a pytree."""
    return sum(int(np.prod(x.shape, dtype=np.int64)) * _itemsize(x.dtype) for x in jax.tree.leaves(tree))


def build_optimizer(optimizer: str = "adamw", paged: bool = True, min_size: int = PAGED_MIN_SIZE):
    """The optimizer of ``train_lib.build_optimizer`` (clip 0.3, a warmup schedule, AdamW or 8-bit)."""
    import optax

    from qlora_jax import optim

    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {optimizer!r}")
    schedule = optax.join_schedules([optax.linear_schedule(0.0, 2e-4, 10), optax.constant_schedule(2e-4)], [10])
    adam = optim.adamw(schedule, b2=0.999, weight_decay=0.0, eight_bit=optimizer == "adamw_8bit")
    inner = optax.chain(optax.clip_by_global_norm(0.3), adam)
    return (optim.paged(inner, min_size=min_size) if paged else inner), inner


def compiled_memory(
    cfg: LlamaConfig,
    quant: QuantConfig | None,
    lora: LoRAConfig,
    batch: int,
    seq_len: int,
    remat: bool,
    accum_steps: int = 1,
    optimizer: str = "adamw",
    paged: bool = False,
    min_size: int = PAGED_MIN_SIZE,
    dtype=jnp.bfloat16,
) -> dict[str, int]:
    """``memory_analysis()`` of the compiled train step for abstract inputs (nothing allocated).

    Returns argument/output/alias/temp bytes (and the host_* fields) and ``peak`` = argument +
    output - alias + temp, the device bytes the step needs while it runs. Paged state is given
    ``pinned_host`` shardings; on the CPU backend (jax 0.11.2) those bytes still count in
    ``argument``, on a GPU in ``host_argument``.
    """
    from qlora_jax.nn.lora import split_params
    from qlora_jax.optim.paged import HOST, _map_per_param
    from qlora_jax.train.steps import TrainState, make_train_step

    model = LlamaForCausalLM(cfg, lora=lora, quant=quant, dtype=dtype, remat=remat)
    params, frozen = split_params(abstract_variables(cfg, quant, lora, dtype))
    tx, inner = build_optimizer(optimizer, paged, min_size)
    opt_state = jax.eval_shape(inner.init, params)
    if paged:
        from qlora_jax.optim.paged import PagedState

        host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind=HOST)

        def to_host(_, leaf):
            if int(np.prod(leaf.shape)) < min_size:
                return leaf
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=host)

        shapes = [tuple(x.shape) for x in jax.tree.leaves(params)]
        opt_state = PagedState(_map_per_param(to_host, opt_state, jax.tree.structure(params), shapes))
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, opt_state)
    tokens = (accum_steps, batch, seq_len)
    batch_arrays = {
        "input_ids": jax.ShapeDtypeStruct(tokens, jnp.int32),
        "attention_mask": jax.ShapeDtypeStruct(tokens, jnp.bool_),
        "loss_mask": jax.ShapeDtypeStruct(tokens, jnp.bool_),
    }
    step = jax.jit(make_train_step(model, tx), donate_argnums=(0,))
    stats = step.lower(state, frozen, batch_arrays, jax.random.key(0)).compile().memory_analysis()
    fields = ("argument", "output", "alias", "temp", "host_argument", "host_output", "host_temp")
    out = {f: int(getattr(stats, f"{f}_size_in_bytes")) for f in fields}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out
