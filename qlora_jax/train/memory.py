"""Byte accounting and the "will it fit" planner for QLoRA fine-tuning.

:func:`plan` answers, before anything is allocated, how many bytes one device needs to train a
model with this repo's train step (``qlora_jax.train.steps.make_train_step``), by component. The
exact parts are read off the state the train step holds, not restated:
:func:`qlora_jax.train.state.state_layout` of the same ``LlamaForCausalLM`` and the same optimizer
(:func:`qlora_jax.optim.build_optimizer`) builds the abstract ``{base, params, opt_state}``
(``jax.eval_shape``), its PartitionSpecs (:mod:`qlora_jax.parallel`'s rules) and its memory kinds,
and the plan sums each device's pieces:

* **frozen base, quantized** — exact: the base's :class:`~qlora_jax.quant.QuantizedTensor`\\s
  (codes and block constants), per device as their specs split them;
* **frozen base, other** — exact: the rest of the base (embeddings, ``lm_head`` unless tied,
  norms, biases), in the compute dtype;
* **adapters** — exact: the ``params`` collection (``lora_a``, ``lora_b``), in ``LoRAConfig.dtype``;
* **gradients** — the adapter-shaped gradient of one micro-batch, plus the accumulator the
  step's ``lax.scan`` carries when ``accum_steps > 1``;
* **optimizer state** — exact, by memory kind (``Optimizer.memory_kinds``: paged leaves in
  ``pinned_host``);
* **activations** — an estimate for the remat policy (see :func:`activation_bytes`);
* **optimizer update** — paged state is brought to the device for the update, all of it at once
  with the default ``chunk_bytes=None``; the update runs after the backward pass, so the peak is
  ``max(backward, update)`` transients on top of what stays resident;
* **load** — not part of the step: the base is loaded tensor by tensor straight into its shards,
  so a device peaks at its final base bytes plus the largest checkpoint tensor's piece (bf16).

Validation (``tests/train/test_memory.py``): the planner's device total against
``argument + output - alias + temp`` of the compiled step's ``memory_analysis()`` — on an H100,
LLaMA-7B shapes with 4 of 32 blocks, batch 1 x 512, r=64 bf16 adapters, NF4+DQ: remat +2.1 %
(8 blocks +1.8 %), no remat +6.2 %, paged + 16 accumulation steps +0.8 %; on the CPU, five small
configurations within 10 %. XLA's choices differ between backends (``backend=``) and are not
promises: the estimate is for this code and jax 0.11.2.

Sharding (``mesh={"data": d, "fsdp": f}``): the specs of ``state_layout(..., fsdp=f)``: the base
split over ``fsdp`` where the split is block-aligned, otherwise replicated; adapters and optimizer
state replicated unless ``shard_params=True`` (``params_mode = opt_mode = "fsdp"``); activations
are for the per-device batch ``batch / (d * f)``; with ``f > 1`` one decoder block's base is
gathered at a time, so one block's unsharded bytes are added.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from qlora_jax import parallel
from qlora_jax.nn.llama import ATTENTION_CHUNK, LlamaConfig, LlamaForCausalLM
from qlora_jax.nn.lora import LoRAConfig, QuantConfig
from qlora_jax.nn.moe import MOE_DISPATCH
from qlora_jax.optim import OPTIMIZERS as _CONFIG_OPTIMIZERS
from qlora_jax.optim import OptimizerConfig, build_optimizer
from qlora_jax.quant import is_quantized
from qlora_jax.train.state import StateLayout, state_layout

KiB, MiB, GiB = 2**10, 2**20, 2**30
# What a device cannot give to arrays: the CUDA context, cuBLAS/cuDNN workspaces and allocator
# fragmentation. An allowance, not a measurement: 1 GiB + 5 % of the device. Note that JAX
# preallocates only 75 % of a GPU by default: set XLA_PYTHON_CLIENT_MEM_FRACTION=.95 (or
# XLA_PYTHON_CLIENT_PREALLOCATE=false) for plans near the limit.
RESERVE_BYTES = 1 * GiB
RESERVE_FRACTION = 0.05
# plan()'s ``optimizer``: the builder's names without "paged_" (``paged=`` says that)
OPTIMIZERS = tuple(o for o in _CONFIG_OPTIMIZERS if not o.startswith("paged_"))
# the remat policies whose activations the planner models (the dots_* ones it does not)
PLANNED_POLICIES = ("nothing_saveable", "save_linears", "offload_linears")
CHECKPOINT_ITEMSIZE = 2  # a checkpoint tensor is read in bf16 (the HF checkpoints' dtype) for the load peak


def _itemsize(dtype) -> int:
    return int(jnp.dtype(dtype).itemsize)


def _nbytes(x) -> int:
    return int(np.prod(x.shape, dtype=np.int64)) * _itemsize(x.dtype)


def tree_nbytes(tree) -> int:
    """Bytes of the arrays (or ShapeDtypeStructs) of a pytree."""
    return sum(_nbytes(x) for x in jax.tree.leaves(tree))


# --- the state the train step holds --------------------------------------------------------------


def optimizer_config(optimizer: str = "adamw", paged: bool = True, min_size: int | None = None, chunk_bytes=None):
    """The :class:`~qlora_jax.optim.OptimizerConfig` of ``plan``'s optimizer arguments."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS} (paging: paged=True); got {optimizer!r}")
    kw = {} if min_size is None else {"paged_min_size": min_size}
    return OptimizerConfig(optimizer=("paged_" if paged else "") + optimizer, paged_chunk_bytes=chunk_bytes, **kw)


@functools.lru_cache(maxsize=64)
def _layout(cfg, quant, lora, dtype, remat, scan_layers, opt: OptimizerConfig, fsdp: int, mode: str) -> StateLayout:
    model = LlamaForCausalLM(cfg, lora=lora, quant=quant, dtype=dtype, remat=remat, scan_layers=scan_layers)
    return state_layout(model, build_optimizer(opt), fsdp=fsdp, params_mode=mode, opt_mode=mode)


def train_layout(
    model_config: LlamaConfig,
    quant: QuantConfig | None = QuantConfig(),
    lora: LoRAConfig | None = LoRAConfig(dtype=jnp.bfloat16),
    *,
    optimizer: OptimizerConfig | None = None,
    fsdp: int = 1,
    shard_params: bool = False,
    scan_layers: bool = True,
    remat: bool = True,
    dtype=jnp.bfloat16,
) -> StateLayout:
    """The :class:`~qlora_jax.train.state.StateLayout` :func:`plan` counts (cached: abstract, ~1 s).

    ``optimizer``: the builder's config (None: ``OptimizerConfig()``, the recipe's paged AdamW).
    """
    mode = "fsdp" if shard_params else "replicated"
    opt = OptimizerConfig() if optimizer is None else optimizer
    return _layout(model_config, quant, lora, dtype, remat, scan_layers, opt, fsdp, mode)


def _block_bytes(base) -> int:
    """One decoder block's base bytes, unsharded: the scanned ``layers`` subtree over its ``L``
    (every leaf stacks the layers on axis 0), or the largest ``layers_i``."""
    if "layers" in base:
        layers = base["layers"]
        depth = jax.tree.leaves(layers)[0].shape[0]
        return tree_nbytes(layers) // depth
    return max((tree_nbytes(v) for k, v in base.items() if k.startswith("layers_")), default=0)


def _largest_checkpoint_piece(layout: StateLayout, mesh_shape: Mapping[str, int]) -> int:
    """Bytes of the largest checkpoint tensor's piece on one device, in bf16: a 4-bit linear's
    ``prod(shape)`` elements (its rows split as its codes are), a plain array's (one layer of a
    scanned ``layers`` leaf) split as its spec splits it."""
    flat = jax.tree_util.tree_flatten_with_path(layout.abstract.base, is_leaf=is_quantized)[0]
    specs = jax.tree.leaves(layout.specs.base, is_leaf=lambda x: is_quantized(x) or isinstance(x, P))
    largest = 0
    for (path, x), spec in zip(flat, specs, strict=True):
        if is_quantized(x):
            n, spec = int(np.prod(x.shape, dtype=np.int64)), spec.packed
        else:
            stacked = getattr(path[0], "key", None) == "layers"
            n = int(np.prod(x.shape[1:] if stacked else x.shape, dtype=np.int64))
        largest = max(largest, CHECKPOINT_ITEMSIZE * n // parallel.spec_ways(spec, mesh_shape))
    return largest


def _largest_paged_param(layout: StateLayout, mesh_shape: Mapping[str, int]) -> int:
    """One device's paged bytes of the parameter with the most (paged moves a parameter's state
    leaves together, so that is the least one chunk brings to the device)."""
    params = {jax.tree_util.keystr(path) for path, *_ in layout.leaves("params")}
    per_param: dict[str, int] = {}
    for path, x, spec, kind in layout.leaves("opt_state"):
        if kind != "pinned_host":
            continue
        name = next((s for k in range(len(path)) if (s := jax.tree_util.keystr(path[k:])) in params), "")
        per_param[name] = per_param.get(name, 0) + _nbytes(x) // parallel.spec_ways(spec, mesh_shape)
    return max(per_param.values(), default=0)


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
    remat_policy: str = "nothing_saveable",
    moe_dispatch: str = "sorted",
) -> dict[str, int]:
    """Estimated activation bytes of one micro-batch's forward + backward, per device.

    Counted from what ``nn/llama.py`` computes for ``N = batch * seq_len`` tokens and what
    reverse-mode autodiff keeps for the backward pass (``c`` = compute dtype bytes), then checked
    against XLA's buffer assignment (``memory_analysis``) on CPU and on an H100:

    * ``per_token`` of one decoder block: the block input and the two norm outputs (``3cD``) and
      their float32 upcasts (``8D``); q, k, v and the attention output (``c(2q + 2kv)``) and
      roped q/k in float32 (``4(q + kv)``); what chunked attention saves, its float32 output and
      each query's log-sum-exp (``4q + 4H``: no ``[T, T]`` term, :mod:`qlora_jax.nn.attention`);
      gate, up and the
      SwiGLU product in ``c`` and float32 (``(3c + 12) F``); the adapters' rank-``r``
      intermediates (``2cr`` per target).
    * ``dequantized``: at training sizes ``qmatmul`` runs a dequantize + GEMM path, dequantizing each
      4-bit weight to ``c`` for an XLA GEMM (``pallas_dequant``; the CPU's ``xla`` path alike).
      Without remat, XLA merges the forward's and the backward's dequantize (CSE), so every
      block keeps its dequantized weights; with remat, one block's at a time.
    * remat=False saves ``per_token * N`` (+ the dequantized weights) per block; remat=True saves
      each block's input (``cDN``) and recomputes one block at a time (``working``). With
      ``remat_policy="save_linears"`` every block also keeps its linears' outputs (``c`` times the
      sum of their output widths per token), which the recomputed block then does not hold again;
      ``"offload_linears"`` keeps them in host memory instead (``offloaded``; a GPU's — XLA:CPU
      ignores the offload, measured, so ``backend="cpu"`` counts them on the device).
    * LoRA dropout draws uint32 random bits over each target's input. XLA:CPU keeps them (twice:
      forward and recompute) for every block, even under remat; XLA:GPU fuses them into the mask
      and keeps one block's two bool masks.
    * Unquantized linears (16-bit LoRA) on XLA:CPU also keep their float32 GEMM outputs
      (``4 * out`` per token; measured — the quantized path is a ``custom_vjp`` that saves none).
    * The head: float32 logits, log-softmax and its cotangent (``3 * 4 V`` per token). It is
      alive before the blocks' backward pass, so it overlaps with ``working`` (max of the two).
    * One key chunk of attention in flight (``C = min(T, 512)`` keys), freed before the next:
      float32 scores and softmax and the probabilities in ``c`` (``(8 + c) H C`` per token; at
      ``T <= C`` the terms of the whole-matrix attention this was validated with on an H100),
      in ``working``.

    Returns:
      ``saved`` (all blocks), ``dropout`` (what dropout keeps), ``working`` (max of head and one
      recomputed block), ``dequantized`` (one block's dequantized weights, with remat) — to add —
      and ``offloaded`` (host bytes, not among them).
    """
    if backend not in ("gpu", "cpu"):
        raise ValueError(f"backend must be 'gpu' or 'cpu'; got {backend!r}")
    if remat and remat_policy not in PLANNED_POLICIES:
        raise ValueError(f"the planner models remat_policy in {PLANNED_POLICIES}; got {remat_policy!r}")
    n = batch * seq_len
    c = _itemsize(dtype)
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    q, kv = h * cfg.dim_head, cfg.num_key_value_heads * cfg.dim_head
    r = lora.rank if lora is not None else 0
    targets = [t for t in cfg.linear_names if lora is not None and r > 0 and t in lora.targets]
    experts = cfg.expert_names if cfg.num_experts else ()

    def block(m: int) -> tuple[dict[str, tuple[int, int]], int]:
        """A block's linears' (in, out) per token and its per-token bytes, with ``m`` expert rows
        per token."""
        dims = cfg.linear_dims()  # one expert's, for a MoE linear
        rows = {name: m if name in experts else 1 for name in dims}
        dims = {name: (rows[name] * i, rows[name] * o) for name, (i, o) in dims.items()}
        width = m * cfg.moe_hidden_size + cfg.shared_expert_intermediate_size if experts else f
        per_token = (
            3 * c * d
            + 8 * d
            + c * (2 * q + 2 * kv)
            + 4 * (q + kv)
            + 4 * q
            + 4 * h
            + (3 * c + 12) * width
            + 2 * c * r * sum(rows[t] for t in targets)
            + (4 * m * d if experts else 0)  # the weighted expert outputs, float32
            + sum(2 * c * dims[t][1] for t in targets if t in experts)  # an expert adapter's output and sum
        )
        if quant is None and backend == "cpu":  # unquantized linears keep their float32 GEMM outputs
            per_token += 4 * sum(o for _, o in dims.values())
        return dims, per_token

    weights = {name: i * o for name, (i, o) in cfg.linear_dims().items()}  # a block's, dequantized under remat
    transient = 0  # per token: what one block holds in flight and does not save (no remat)
    if experts:  # all E experts dequantized; a token passes k of them (sorted) or all E (dense)
        e, k = cfg.num_experts, cfg.num_experts_per_tok
        if moe_dispatch not in MOE_DISPATCH:
            raise ValueError(f"moe_dispatch must be one of {MOE_DISPATCH}; got {moe_dispatch!r}")
        for name in experts:
            weights[name] *= e
        weights["shared_expert"] = 3 * d * cfg.shared_expert_intermediate_size
        if moe_dispatch == "dense":
            dims, per_token = block(e)
        elif backend == "cpu":  # XLA:CPU lowers a ragged dot to a dot of each row with every expert (measured)
            dims, per_token = block(k)
            transient = block(e * k)[1] - per_token
        else:
            dims, per_token = block(k)
    else:
        dims, per_token = block(1)
    block_weights = sum(weights.values()) * c if quant is not None else 0
    layers = cfg.num_hidden_layers
    dropout_inputs = n * sum(dims[t][0] for t in targets) if lora is not None and lora.dropout > 0 else 0
    if backend == "cpu":
        dropout = 2 * 4 * dropout_inputs * layers
    else:
        dropout = 2 * dropout_inputs * (1 if remat else layers)
    head = 3 * 4 * cfg.vocab_size * n
    chunk = (8 + c) * h * min(seq_len, ATTENTION_CHUNK) * n
    if remat:
        linears = c * sum(o for _, o in dims.values()) * n  # one block's linear outputs
        kept = {"nothing_saveable": 0, "save_linears": linears, "offload_linears": linears}[remat_policy]
        host = kept if remat_policy == "offload_linears" and backend == "gpu" else 0
        return {
            "saved": (c * d * n + kept - host) * layers,
            "dropout": dropout,
            "working": max(head, max((per_token + transient) * n - kept + host, 0) + chunk),
            "dequantized": block_weights,
            "offloaded": host * layers,
        }
    return {
        "saved": (per_token * n + block_weights) * layers,
        "dropout": dropout,
        "working": max(head, chunk + transient * n),
        "dequantized": 0,
        "offloaded": 0,
    }


# --- the plan ----------------------------------------------------------------------------------


def _fmt(n: int) -> str:
    return f"{n / GiB:8.2f} GiB" if n >= GiB else f"{n / MiB:8.1f} MiB"


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device by component (see :func:`plan`); ``device_bytes`` is the step's peak,
    ``load_peak`` the peak while the base is loaded (both must fit).

    ``rows`` keeps the step's components in table order as ``(name, bytes, memory kind, note)``.
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
    load_peak: int = 0  # the load: final base bytes + the largest checkpoint tensor's piece (bf16)

    @property
    def activation_total(self) -> int:
        """Device bytes of the activations (offloaded ones are host bytes)."""
        return sum(v for k, v in self.activations.items() if k != "offloaded")

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
        return self.optimizer_host + self.activations.get("offloaded", 0)

    @property
    def peak(self) -> int:
        """The larger of the step's peak and the load's."""
        return max(self.device_bytes, self.load_peak)

    @property
    def reserve(self) -> int:
        """Bytes of the device held back: ``RESERVE_BYTES + RESERVE_FRACTION * device_memory``."""
        return 0 if self.device_memory is None else RESERVE_BYTES + int(RESERVE_FRACTION * self.device_memory)

    @property
    def usable(self) -> int | None:
        return None if self.device_memory is None else self.device_memory - self.reserve

    @property
    def fits(self) -> bool | None:
        """Both the train step's peak and the load's fit the usable bytes."""
        return None if self.device_memory is None else self.peak <= self.usable

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
            ("activations: offloaded", a.get("offloaded", 0), "host", "estimate: linears' outputs (offload_linears)"),
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
        lines.append(
            f"{'load peak':<28} {_fmt(self.load_peak)}  {'device':<7} "
            "base shards + the largest checkpoint tensor's piece (bf16)"
        )
        if self.device_memory is not None:
            lines.append(
                f"{'device memory':<28} {_fmt(self.device_memory)}  usable {_fmt(self.usable).strip()} "
                f"(reserve {_fmt(self.reserve).strip()} = {RESERVE_BYTES // MiB} MiB + {RESERVE_FRACTION:.0%})"
            )
            margin = self.usable - self.peak
            verdict = "fits" if self.fits else "does not fit"
            which = " (the load peak)" if self.load_peak > self.device_bytes else ""
            lines.append(
                f"verdict: {verdict} ({'headroom' if self.fits else 'short by'} {_fmt(abs(margin)).strip()}{which})"
            )
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
    remat_policy: str = "nothing_saveable",
    accum_steps: int = 1,
    optimizer: str = "adamw",
    min_size: int = OptimizerConfig.paged_min_size,
    shard_params: bool = False,
    scan_layers: bool = True,
    chunk_bytes: int | None = None,
    dtype=jnp.bfloat16,
    device_memory: int | None = None,
    backend: str = "gpu",
    moe_dispatch: str = "sorted",
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
      remat: ``nn.remat`` per decoder block.
      remat_policy: what a rematerialized block keeps, in :data:`PLANNED_POLICIES`
        (``config.train.remat_policy``; :data:`qlora_jax.nn.llama.REMAT_POLICIES`).
      moe_dispatch: a MoE model's ``config.train.moe_dispatch`` (:data:`qlora_jax.nn.moe.MOE_DISPATCH`).
      accum_steps: micro-batches per step; the step's scan carries a gradient accumulator.
      optimizer: ``"adamw"`` or ``"adamw_8bit"`` (with ``paged``: the builder's ``paged_adamw``,
        ``paged_adamw_8bit``).
      min_size: ``OptimizerConfig.paged_min_size``.
      shard_params: adapters, gradients and optimizer state sharded over ``fsdp`` too
        (``config.sharding.params = opt_state = "fsdp"``).
      scan_layers: the model's layer layout (:class:`~qlora_jax.nn.LlamaForCausalLM`): stacked
        adapter leaves are ``L`` times larger, so paging's ``min_size`` sees them differently.
      chunk_bytes: ``OptimizerConfig.paged_chunk_bytes``: paged state brought to the device at
        once for the update (None, its default: all of it — which costs two copies of the paged
        state on the device during the update).
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
    opt = optimizer_config(optimizer, paged, min_size, chunk_bytes)
    layout = train_layout(
        model_config, quant, lora, optimizer=opt, fsdp=fsdp, shard_params=shard_params, scan_layers=scan_layers,
        remat=remat, dtype=dtype,
    )  # fmt: skip
    held = layout.device_bytes(m)
    base = sum(held["base"].values())
    quantized = layout.quantized_base_bytes(m)
    adapters = sum(held["params"].values())
    grads = adapters * (2 if accum_steps > 1 else 1)
    opt_device, opt_host = held["opt_state"].get("device", 0), held["opt_state"].get("pinned_host", 0)
    gathered = _block_bytes(layout.abstract.base) if fsdp > 1 else 0
    acts = activation_bytes(
        model_config, lora, quant, batch // devices, seq_len, remat, dtype, backend, remat_policy, moe_dispatch
    )
    backward = sum(acts.values()) + gathered
    # the update runs after the backward pass: paged moments come to the device (all at once
    # with chunk_bytes=None, else the largest chunk) and new ones are written before going back.
    fetched = opt_host
    if chunk_bytes is not None and opt_host:
        fetched = min(opt_host, max(chunk_bytes, _largest_paged_param(layout, m)))
    update_extra = max(0, 2 * fetched - backward)
    batch_bytes = accum_steps * (batch // devices) * seq_len * (4 + 1 + 1)
    notes = []
    if opt_host:
        notes.append(f"paged: state leaves >= {opt.paged_min_size:,} elements live in pinned host memory between steps")
    return MemoryPlan(
        frozen_quantized=quantized,
        frozen_other=base - quantized,
        gathered_block=gathered,
        adapters=adapters,
        grads=grads,
        optimizer_device=opt_device,
        optimizer_host=opt_host,
        activations=acts,
        update_extra=update_extra,
        batch_bytes=batch_bytes,
        device_memory=device_memory,
        notes=tuple(notes),
        load_peak=base + _largest_checkpoint_piece(layout, m),
    )


# --- the real step, for validation ----------------------------------------------------------------


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
    min_size: int = OptimizerConfig.paged_min_size,
    dtype=jnp.bfloat16,
    remat_policy: str = "nothing_saveable",
    moe_dispatch: str = "sorted",
) -> dict[str, int]:
    """``memory_analysis()`` of the compiled train step for abstract inputs (nothing allocated).

    The state is :func:`train_layout`'s (the planner's); its ``pinned_host`` leaves get host
    shardings. Returns argument/output/alias/temp bytes (and the host_* fields) and ``peak`` =
    argument + output - alias + temp, the device bytes the step needs while it runs. On the CPU
    backend (jax 0.11.2) paged bytes still count in ``argument``, on a GPU in ``host_argument``.
    """
    from qlora_jax.train.steps import TrainState, make_train_step

    opt = optimizer_config(optimizer, paged, min_size)
    layout = train_layout(cfg, quant, lora, optimizer=opt, remat=remat, dtype=dtype)
    model = LlamaForCausalLM(cfg, lora=lora, quant=quant, dtype=dtype, remat=remat, remat_policy=remat_policy,
                             moe_dispatch=moe_dispatch)  # fmt: skip
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")

    def place(x, kind):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=host) if kind == "pinned_host" else x

    opt_state = jax.tree.map(place, layout.abstract.opt_state, layout.kinds.opt_state)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), layout.abstract.params, opt_state)
    tokens = (accum_steps, batch, seq_len)
    batch_arrays = {
        "input_ids": jax.ShapeDtypeStruct(tokens, jnp.int32),
        "attention_mask": jax.ShapeDtypeStruct(tokens, jnp.bool_),
        "loss_mask": jax.ShapeDtypeStruct(tokens, jnp.bool_),
    }
    built = build_optimizer(opt)
    step = jax.jit(make_train_step(model, built.tx, built.schedule), donate_argnums=(0,))
    stats = step.lower(state, layout.abstract.base, batch_arrays, jax.random.key(0)).compile().memory_analysis()
    fields = ("argument", "output", "alias", "temp", "host_argument", "host_output", "host_temp")
    out = {f: int(getattr(stats, f"{f}_size_in_bytes")) for f in fields}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out
