"""The mixture-of-experts MLP of Mixtral, Qwen2-MoE and Qwen3-MoE, with LoRA on every expert.

    probs = softmax(x Wr^T) (float32);  w, e = top_k(probs, k);  w /= sum(w) (``norm_topk_prob``)
    y = sum_j w_j · down_e_j(act(gate_e_j(x)) · up_e_j(x))  [+ sigmoid(x Ws^T) · shared(x)]

as transformers 5.24 computes it (``MixtralTopKRouter`` / ``Qwen2MoeTopKRouter`` and their
experts). Each expert's ``gate_proj`` / ``up_proj`` / ``down_proj`` is its own ``[out, in]``
linear, quantized on its own (bitsandbytes' layout, as transformers 4.x stored experts), and its
own LoRA target; an expert linear's variables stack the experts on a leading ``[E]`` axis
(``base``: ``experts.gate_proj.kernel``, a QuantizedTensor of per-expert shape ``[I, D]`` whose
arrays are ``[E, ...]``; ``params``: ``lora_a [E, r, D]``, ``lora_b [E, I, r]``).

No Python loop over experts: ``dispatch="sorted"`` sorts the ``N·k`` (token, expert) pairs by
expert and multiplies each expert's rows by its weight in one grouped matmul
(``jax.lax.ragged_dot_general``: ``N·k`` rows, whatever ``E``); ``dispatch="dense"`` runs every
expert on every token and weights the results (``E / k`` times the FLOPs, no gather or sort:
cheaper only at small ``E``; ``experiments/bench_moe.py`` measures both).

The router (``gate.weight [E, D]``) stays in the model's dtype, unquantized and untrained: it is
not a linear in transformers 5 (bitsandbytes leaves it alone) and PEFT excludes it by default.
Its load-balancing statistics (Switch Transformer's auxiliary loss, transformers'
``load_balancing_loss_func``) are returned with the output, for ``router_aux_loss_coef``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from qlora_jax import parallel, quant
from qlora_jax.nn.lora import LINEAR_OUTPUT, LoRAConfig, QuantConfig, hf_module_name, init_lora_a, init_lora_b

Array = jax.Array
MOE_DISPATCH = ("sorted", "dense")
EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj")


def is_expert_path(path: tuple[str, ...], stacked: bool | None = None) -> bool:
    """Whether a flattened variable path is a MoE expert linear's leaf: stacked, as the model holds
    it (``(..., "experts", "gate_proj", "kernel")``, arrays ``[E, ...]``), or one expert's, after
    :func:`qlora_jax.nn.llama.unstack_experts` (``(..., "experts", "3", "gate_proj", "kernel")``).
    ``stacked`` True or False accepts only that form."""
    is_stacked = len(path) >= 3 and path[-3] == "experts"
    per_expert = len(path) >= 4 and path[-4] == "experts" and path[-3].isdigit()
    return {None: is_stacked or per_expert, True: is_stacked, False: per_expert}[stacked]


# lhs [rows, in] grouped by expert, rhs [E, out, in]: each group of rows times its expert's rhs^T
_GROUPED = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0]
)


class RouterStats(NamedTuple):
    """What the load-balancing loss needs, summed over tokens (and over layers, once added up):
    ``counts [E]`` top-k assignments per expert, ``probs [E]`` router probabilities per expert,
    ``rows`` the tokens counted (padding excluded)."""

    counts: Array
    probs: Array
    rows: Array


def route(logits: Array, k: int, normalize: bool) -> tuple[Array, Array, Array]:
    """``(weights [N, k] float32, experts [N, k] int32, probs [N, E] float32)``: softmax in float32,
    then top-k (ties to the lower index, as ``torch.topk``), renormalized when ``normalize``."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32), probs


def router_stats(probs: Array, experts: Array, mask: Array) -> RouterStats:
    """One layer's :class:`RouterStats` from ``probs [N, E]``, ``experts [N, k]`` and ``mask [N]``."""
    m = mask.astype(jnp.float32)
    one_hot = jax.nn.one_hot(experts, probs.shape[-1], dtype=jnp.float32)  # [N, k, E]
    return RouterStats(
        counts=jnp.einsum("nke,n->e", one_hot, m), probs=jnp.einsum("ne,n->e", probs, m), rows=jnp.sum(m)
    )


def load_balancing_loss(stats: RouterStats) -> Array:
    """``E · sum_e f_e · P_e`` with ``f`` the fraction of assignments and ``P`` the mean router
    probability per expert, both over all layers' rows: transformers' ``load_balancing_loss_func``
    (which divides both sums by the rows of every layer together)."""
    rows = jnp.maximum(stats.rows, 1.0)
    return stats.counts.shape[-1] * jnp.sum((stats.counts / rows) * (stats.probs / rows))


class ExpertLinear(nn.Module):
    """``E`` frozen linears ``[out, in]`` stacked on a leading axis (one QuantizedTensor whose arrays
    are ``[E, ...]``, each expert quantized on its own, or a plain ``[E, out, in]`` array), with a
    LoRA adapter per expert when ``lora`` is set.

    ``__call__(x, group_sizes)``: ``x [rows, in]`` sorted by expert with ``group_sizes [E]`` rows
    each -> ``[rows, out]``; without ``group_sizes``, ``x`` is ``[N, in]`` (every expert's input)
    or ``[E, N, in]`` -> ``[E, N, out]``.
    """

    num_experts: int
    features: int
    lora: LoRAConfig | None = None
    quant: QuantConfig | None = None
    dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(self, x: Array, group_sizes: Array | None = None, deterministic: bool = True) -> Array:
        e, out, inn = self.num_experts, self.features, x.shape[-1]

        def init_kernel():
            w = nn.initializers.normal(0.02)(self.make_rng("params"), (e, out, inn), jnp.float32)
            module = hf_module_name(self.scope.path)
            storage = self.quant.for_module(module) if self.quant is not None else None
            if storage is None:
                return w.astype(self.dtype)
            return jax.vmap(lambda w: storage.quantize(w, module or "kernel"))(w)

        kernel = parallel.gather(self.variable("base", "kernel", init_kernel).value)
        if quant.is_quantized(kernel):
            if kernel.shape != (out, inn) or kernel.packed.shape[0] != e:
                raise ValueError(f"{self.name}: frozen expert kernels have shape {kernel.packed.shape[:1]} x "
                                 f"{kernel.shape}; expected [{e}] x {(out, inn)}")  # fmt: skip
            # the layer's experts in the compute dtype: one transient [E, out, in] per linear
            w = jax.vmap(lambda q: quant.dequantize(q, self.dtype))(kernel)
        else:
            w = jnp.asarray(kernel).astype(self.dtype)
        x = x.astype(self.dtype)
        y = _expert_matmul(x, w, group_sizes)
        if self.lora is not None and self.lora.rank > 0:
            r, cfg = self.lora.rank, self.lora
            if cfg.use_dora:
                raise ValueError(f"{self.name}: DoRA (LoRAConfig.use_dora) is not implemented for MoE experts; "
                                 "leave the experts' linears out of the targets")  # fmt: skip
            a = self.param("lora_a", lambda k: init_lora_a(k, (e, r, inn), cfg.init, cfg.dtype))
            b = self.param("lora_b", lambda k: init_lora_b((e, out, r), cfg.dtype))
            a, b = parallel.gather((a, b))
            h = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
            h = _expert_matmul(h, a.astype(self.dtype), group_sizes)  # [..., r]
            h = _expert_matmul(h, b.astype(self.dtype), group_sizes)  # [..., out]
            y = y + (h.astype(jnp.float32) * cfg.scale).astype(self.dtype)
        return jax.ad_checkpoint.checkpoint_name(y, LINEAR_OUTPUT)


def _expert_matmul(x: Array, w: Array, group_sizes: Array | None) -> Array:
    """``x`` times each expert's ``w [E, out, in]`` transposed, float32 accumulation (see
    :class:`ExpertLinear` for the two layouts)."""
    if group_sizes is not None:
        y = jax.lax.ragged_dot_general(x, w, group_sizes, _GROUPED, preferred_element_type=jnp.float32)
    elif x.ndim == 2:  # every expert sees the same tokens
        y = jnp.einsum("ni,eoi->eno", x, w, preferred_element_type=jnp.float32)
    else:
        y = jnp.einsum("eni,eoi->eno", x, w, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


class Experts(nn.Module):
    """A layer's experts (``experts``: ``gate_proj``, ``up_proj``, ``down_proj`` — ``names`` — each
    an :class:`ExpertLinear`) applied to the tokens the router sent them.

    ``__call__(tokens [N, D], weights [N, k], experts [N, k]) -> [N, D]`` (float32).
    """

    num_experts: int
    hidden: int
    act: Any
    names: tuple[str, str, str] = EXPERT_LINEARS  # (gate, up, down); Mixtral's: ("w1", "w3", "w2")
    lora: LoRAConfig | None = None
    quant: QuantConfig | None = None
    dtype: Any = jnp.bfloat16
    dispatch: str = "sorted"

    @nn.compact
    def __call__(self, tokens: Array, weights: Array, experts: Array, deterministic: bool = True) -> Array:
        if self.dispatch not in MOE_DISPATCH:
            raise ValueError(f"moe_dispatch must be one of {MOE_DISPATCH}; got {self.dispatch!r}")
        n, d = tokens.shape
        e, k = self.num_experts, experts.shape[-1]

        def linear(name, features):
            adapter = self.lora if self.lora is not None and name in self.lora.targets else None
            return ExpertLinear(e, features, adapter, self.quant, self.dtype, name=name)

        g, u, dn = self.names
        gate, up, down = linear(g, self.hidden), linear(u, self.hidden), linear(dn, d)

        def mlp(x, sizes):
            h = self.act(gate(x, sizes, deterministic).astype(jnp.float32)) * up(x, sizes, deterministic).astype(
                jnp.float32
            )
            return down(h.astype(self.dtype), sizes, deterministic).astype(jnp.float32)

        if self.dispatch == "dense":  # every expert on every token, weighted by the router (0 off its top-k)
            combine = jnp.einsum("nk,nke->ne", weights, jax.nn.one_hot(experts, e, dtype=jnp.float32))
            return jnp.einsum("ne,end->nd", combine, mlp(tokens, None))
        flat = experts.reshape(-1)  # [N·k]: token n's j-th choice at n·k + j
        order = jnp.argsort(flat, stable=True)  # the pairs grouped by expert
        rows = order // k  # each sorted pair's token
        sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
        ys = mlp(tokens[rows], sizes) * weights.reshape(-1)[order][:, None]  # [N·k, D]
        return jnp.zeros((n, d), jnp.float32).at[rows].add(ys)


class Router(nn.Module):
    """The router's frozen ``weight [E, D]`` (``gate``): ``__call__(tokens [N, D]) -> logits [N, E]``
    in ``dtype``, as transformers' ``F.linear`` in the model's dtype."""

    num_experts: int
    dtype: Any = jnp.bfloat16

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        shape = (self.num_experts, tokens.shape[-1])
        w = self.variable(
            "base", "weight", lambda: (jax.random.normal(self.make_rng("params"), shape) * 0.02).astype(self.dtype)
        ).value
        w = parallel.gather(w)
        logits = jax.lax.dot_general(tokens.astype(self.dtype), w.astype(self.dtype), (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)  # fmt: skip
        return logits.astype(self.dtype)
