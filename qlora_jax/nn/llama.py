"""The decoder of the LLaMA family and its descendants, in flax.linen, with LoRA on its linears.

Matches transformers' ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM``, ``GemmaForCausalLM``, ``Gemma2ForCausalLM``, ``Gemma3ForCausalLM`` and
``Phi3ForCausalLM``: RMSNorm
in float32 (Gemma's ``1 + w`` form too), rotary embeddings in the rotate-half convention (default,
linear and llama3 frequency scaling; Gemma 3's own base for sliding layers), grouped-query
attention (chunked, :mod:`qlora_jax.nn.attention`), SwiGLU or GeGLU MLPs (Phi-3's projections
fused: ``qkv_proj``, ``gate_up_proj``), tied or untied
embeddings, causal + padding + packed-segment masks, sliding-window layers (all of them, or per
``layer_types``), Gemma 2's soft-capping, and a KV cache for generation. :class:`LlamaConfig` says
which of these a checkpoint uses.

Variables:

* ``"base"`` — everything from the checkpoint, named as transformers names it:
  ``embed_tokens.embedding [V, D]``, ``layers_{i}.self_attn.{q,k,v,o}_proj.kernel [out, in]``
  (a QuantizedTensor when quantized; ``bias`` for Qwen2), ``layers_{i}.mlp.{gate,up,down}_proj``
  (Phi-3: ``self_attn.{qkv,o}_proj``, ``mlp.{gate_up,down}_proj``: :attr:`LlamaConfig.linear_names`),
  ``layers_{i}.{input,post_attention}_layernorm.weight`` (Gemma 2/3 also
  ``{pre,post}_feedforward_layernorm``; Qwen3 / Gemma 3 ``self_attn.{q,k}_norm``), ``norm.weight``,
  ``lm_head.kernel [V, D]`` (absent when tied). Embeddings, norms and lm_head stay unquantized.
  With ``scan_layers`` (the default) the blocks are one ``layers`` subtree whose leaves carry a
  leading ``[L]`` axis (``layers.self_attn.q_proj.kernel``: a QuantizedTensor of per-layer shape
  ``[out, in]`` whose arrays are ``[L, ...]``); :func:`unstack_layers` gives the ``layers_{i}`` form.
* ``"params"`` — LoRA adapters only (``lora_a``, ``lora_b``) of the target linears.
* ``"cache"`` — the KV cache in decode mode (:func:`init_cache`).

Shapes: ``B`` batch, ``S`` sequence, ``H`` query heads, ``Hkv`` key/value heads, ``Dh`` head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from qlora_jax import parallel, quant
from qlora_jax.nn import attention, moe
from qlora_jax.nn.lora import LINEAR_OUTPUT, LoRAConfig, LoRADense, QuantConfig

Array = jax.Array
MODEL_TYPES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen2_moe",
    "qwen3_moe",
)  # fmt: skip
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
LAYER_TYPES = ("full_attention", "sliding_attention")
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True)}
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Phi-3 stores q/k/v as one linear and gate/up as another, and PEFT names them so
FUSED_LINEAR_NAMES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# Qwen2-MoE's shared expert is gated by a linear of one output; Mixtral's experts are w1, w2, w3
SHARED_EXPERT_GATE = "shared_expert_gate"
MIXTRAL_EXPERT_NAMES = ("w1", "w2", "w3")
# of any family
ALL_LINEAR_NAMES = tuple(
    dict.fromkeys(LINEAR_NAMES + FUSED_LINEAR_NAMES + (SHARED_EXPERT_GATE,) + MIXTRAL_EXPERT_NAMES)
)
# qlora_jax.nn.attention's chunked_attention / reference_attention / dot_product_attention
ATTENTION = ("chunked", "reference", "dot_product")
ATTENTION_CHUNK = 512  # keys per step of chunked attention
ROUTER_STATS = "router_stats"  # the "intermediates" entry a MoE model sows (qlora_jax.nn.moe.RouterStats)
# what a rematerialized decoder block keeps for the backward pass (LlamaForCausalLM.remat_policy,
# config.train.remat_policy): nothing_saveable keeps only each block's input and recomputes the
# block; save_linears also keeps every linear's output (q/k/v/o, gate/up/down: the matmuls, not
# their recompute), offload_linears keeps them in host memory (pinned_host; a GPU's host RAM). The
# dots_* policies see only plain dots: the adapters', not the 4-bit linears' (qmatmul is a custom_vjp)
REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "save_linears": jax.checkpoint_policies.save_only_these_names(LINEAR_OUTPUT),
    "offload_linears": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=[LINEAR_OUTPUT],
        offload_src="device",
        offload_dst="pinned_host",
    ),
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# config.json keys whose math this decoder does not implement, with the value that means "off":
# any other value is refused (``LlamaConfig.from_hf``), never ignored
_UNIMPLEMENTED = {
    "partial_rotary_factor": 1.0,
    "use_bidirectional_attention": False,
    "attention_dropout": 0.0,
    "use_qk_norm": False,
    "logits_scaling": 1.0,
    "embedding_multiplier": 1.0,
    "residual_multiplier": 1.0,
    "attention_multiplier": None,
    "no_rope_layers": None,
    "resid_pdrop": 0.0,  # Phi-3's dropouts beside attention's
    "embd_pdrop": 0.0,
    "router_jitter_noise": 0.0,  # Mixtral's multiplicative noise on the router's input in training
    "decoder_sparse_step": 1,  # Qwen-MoE: dense MLPs between MoE layers (every layer MoE here)
    "mlp_only_layers": [],
}
_GEMMA = ("gemma", "gemma2", "gemma3_text")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture, as in a transformers ``config.json`` (both the 4.x and 5.x forms), for every
    family the decoder implements (:data:`MODEL_TYPES`):

    * LLaMA 1/2/3, Mistral (all layers sliding), Qwen2 (q/k/v bias);
    * Qwen3: RMSNorm of each head's queries and keys before rotary (``qk_norm``);
    * Gemma: GeGLU (``hidden_act="gelu_pytorch_tanh"``), ``(1 + w)`` RMSNorm computed in float32
      (``norm_unit_offset``), embeddings scaled by ``sqrt(hidden_size)``;
    * Gemma 2: also norms after attention and around the MLP (``sandwich_norms``), queries scaled
      by ``query_pre_attn_scalar ** -0.5``, attention and final logits soft-capped
      (``cap * tanh(x / cap)``), sliding-window and global layers alternating (``layer_types``);
    * Gemma 3 (text): Gemma 2 without soft-capping, with ``qk_norm``, five sliding layers per
      global one, and the sliding layers' own rotary base (``local_rope_theta``);
    * Phi-3: LLaMA with q/k/v in one linear ``qkv_proj`` (rows: queries, keys, values) and gate/up
      in one ``gate_up_proj`` (rows: gate, up) (``fused_projections``), every layer sliding when a
      window is set (Mistral's rule);
    * Mixtral, Qwen2-MoE, Qwen3-MoE: the MLP is a mixture of ``num_experts`` SwiGLU experts of
      ``moe_intermediate_size``, ``num_experts_per_tok`` of them per token (:mod:`qlora_jax.nn.moe`);
      the router's top-k probabilities renormalized when ``norm_topk_prob`` (always for Mixtral);
      Qwen2-MoE adds a shared expert of ``shared_expert_intermediate_size`` gated by a sigmoid, and
      q/k/v bias; Qwen3-MoE is Qwen3's attention (q/k norm) with experts.
    """

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None  # default hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # {"rope_type": "llama3"|"linear", ...} as items
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v/o bias (LLaMA); Qwen2 has q/k/v bias only
    qkv_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # the window of the layers layer_types calls sliding
    layer_types: tuple[str, ...] | None = None  # per layer, in LAYER_TYPES; None: all sliding iff a window
    hidden_act: str = "silu"  # in ACTIVATIONS
    qk_norm: bool = False
    norm_unit_offset: bool = False
    embed_scale: bool = False
    sandwich_norms: bool = False
    query_pre_attn_scalar: float | None = None  # None: head_dim
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    local_rope_theta: float | None = None  # sliding layers' rotary base (Gemma 3); None: rope_theta
    fused_projections: bool = False  # Phi-3's qkv_proj and gate_up_proj
    num_experts: int = 0  # 0: a dense MLP
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None  # each expert's hidden size; None: intermediate_size
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's shared expert (0: none)
    router_aux_loss_coef: float = 0.0  # the load-balancing loss's weight in training
    model_type: str = "llama"
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):  # accept a dict; store hashable items
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())) or None)
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}; got {self.model_type!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        rope_type = self.rope_scaling_dict.get("rope_type", "default")
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope scaling type {rope_type!r} is not supported (default, linear, llama3)")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported ({', '.join(ACTIVATIONS)})")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(LAYER_TYPES):
                raise ValueError(
                    f"layer_types must name one of {LAYER_TYPES} for each of the {self.num_hidden_layers} layers; "
                    f"got {list(self.layer_types)}"
                )
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be in 1..num_experts ({self.num_experts}); got "
                             f"{self.num_experts_per_tok}")  # fmt: skip
        if self.num_experts and self.fused_projections:
            raise ValueError("experts with fused projections are not implemented")

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling or ())

    @property
    def linear_names(self) -> tuple[str, ...]:
        """The linears of a block, attention's then the MLP's, as checkpoints and PEFT name them
        (a MoE block's gate/up/down are every expert's, and its shared expert's)."""
        if self.fused_projections:
            return FUSED_LINEAR_NAMES
        if self.model_type == "mixtral":  # its experts' w1 (gate), w2 (down), w3 (up), as PEFT targets them
            return LINEAR_NAMES[:4] + MIXTRAL_EXPERT_NAMES
        return LINEAR_NAMES + ((SHARED_EXPERT_GATE,) if self.shared_expert_intermediate_size else ())

    @property
    def mlp_module(self) -> str:
        """The MLP's module name in checkpoints: Mixtral's MoE is ``block_sparse_moe``."""
        return "block_sparse_moe" if self.model_type == "mixtral" else "mlp"

    @property
    def expert_names(self) -> tuple[str, str, str]:
        """An expert's (gate, up, down) linears, as checkpoints name them."""
        return ("w1", "w3", "w2") if self.model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")

    @property
    def moe_hidden_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """``{name: (in, out)}`` of a block's linears."""
        d, f = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.dim_head, self.num_key_value_heads * self.dim_head
        if self.fused_projections:
            return {"qkv_proj": (d, q + 2 * kv), "o_proj": (q, d), "gate_up_proj": (d, 2 * f), "down_proj": (f, d)}
        attn = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d)}
        if self.num_experts:  # one expert's
            f = self.moe_hidden_size
        gate, up, down = self.expert_names
        out = attn | {gate: (d, f), up: (d, f), down: (f, d)}
        if self.shared_expert_intermediate_size:
            out[SHARED_EXPERT_GATE] = (d, 1)
        return out

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: whether it attends within ``sliding_window`` only."""
        if self.layer_types is None:
            return (self.sliding_window is not None,) * self.num_hidden_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @classmethod
    def from_hf(cls, d: dict, *, source: str = "config.json") -> LlamaConfig:
        """Read a transformers config dict (4.x: ``rope_theta``/``rope_scaling``; 5.x: ``rope_parameters``).

        A key that changes the math this decoder does not implement (``partial_rotary_factor``,
        ``attention_dropout`` > 0, another activation or rope type, ...) is refused, naming it.
        """
        model_type = d.get("model_type")
        if model_type == "gemma3":
            raise ValueError(
                f"{source}: model_type 'gemma3' is Gemma 3's vision-language wrapper; the text-only models "
                "(gemma-3-1b, model_type 'gemma3_text') are supported"
            )
        if model_type not in MODEL_TYPES:
            raise ValueError(f"{source}: model_type {model_type!r} is not supported; supported: {MODEL_TYPES}")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"{source}: missing keys {missing}")
        for key, off in _UNIMPLEMENTED.items():
            if d.get(key) is not None and d[key] != off:
                raise ValueError(f"{source}: {key}={d[key]!r} changes the math in a way this decoder does not "
                                 f"implement ({key}={off!r} does)")  # fmt: skip
        gemma = model_type in _GEMMA
        # as transformers reads them: Gemma 2/3 take hidden_activation, Gemma hidden_act (its legacy
        # "gelu" meaning the tanh approximation), the others hidden_act
        if model_type in ("gemma2", "gemma3_text"):
            act = d.get("hidden_activation") or "gelu_pytorch_tanh"
        elif gemma:
            act = d.get("hidden_act") or "gelu_pytorch_tanh"
            act = "gelu_pytorch_tanh" if act == "gelu" else act
        else:
            act = d.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise ValueError(f"{source}: hidden_act {act!r} is not supported ({', '.join(ACTIVATIONS)})")
        rope = dict(d.get("rope_parameters") or {})
        # transformers 5 keeps partial_rotary_factor in rope_parameters (Phi-3 writes 1.0 there)
        partial = rope.pop("partial_rotary_factor", 1.0)
        if partial != 1.0:
            raise ValueError(f"{source}: rope_parameters.partial_rotary_factor={partial!r} changes the math in a "
                             "way this decoder does not implement (1.0 does)")  # fmt: skip
        local_theta = None
        if model_type == "gemma3_text":  # rotary per layer type
            by_type = {t: dict(rope.get(t) or {}) for t in LAYER_TYPES}
            rope = by_type["full_attention"]
            rope.update(d.get("rope_scaling") or {})
            rope.setdefault("rope_theta", d.get("rope_theta", 1_000_000.0))
            local = by_type["sliding_attention"]
            if local.get("rope_type", "default") != "default":
                raise ValueError(f"{source}: sliding layers' rope_type {local['rope_type']!r} is not supported")
            local_theta = float(local.get("rope_theta", d.get("rope_local_base_freq", 10_000.0)))
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        scaling = dict(d.get("rope_scaling") or {}) if model_type != "gemma3_text" else {}
        scaling = scaling or rope
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        scaling.pop("type", None)
        if scaling.get("rope_type", "default") == "default":
            scaling = {}
        if scaling.get("rope_type", "linear") not in ("linear", "llama3"):  # e.g. Phi-3 128k's longrope
            raise ValueError(f"{source}: rope scaling type {scaling['rope_type']!r} is not supported "
                             "(default, linear, llama3)")  # fmt: skip
        if model_type in ("qwen2_moe", "qwen3_moe") and d.get("use_sliding_window"):  # each has its own layer rule
            raise ValueError(f"{source}: use_sliding_window=True is not implemented for {model_type} (False is)")
        sliding, layer_types = _attention_layout(d, model_type)
        eos = d.get("eos_token_id", 2)
        moe = {}
        if model_type in MOE_TYPES:  # Mixtral names its expert count num_local_experts, Qwen num_experts
            experts = d.get("num_local_experts") if model_type == "mixtral" else d.get("num_experts")
            experts = experts or d.get("num_local_experts")
            if not experts or "num_experts_per_tok" not in d:
                raise ValueError(f"{source}: a {model_type} config needs the expert count and num_experts_per_tok")
            moe = dict(
                num_experts=int(experts),
                num_experts_per_tok=int(d["num_experts_per_tok"]),
                moe_intermediate_size=d.get("moe_intermediate_size") if model_type != "mixtral" else None,
                norm_topk_prob=True if model_type == "mixtral" else bool(d.get("norm_topk_prob", False)),
                shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0)
                if model_type == "qwen2_moe" else 0,
                router_aux_loss_coef=float(d.get("router_aux_loss_coef", 0.001)),
            )  # fmt: skip
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=tuple(sorted(scaling.items())) or None,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
            attention_bias=bool(d.get("attention_bias", False)),
            qkv_bias=model_type == "qwen2" or (model_type == "qwen2_moe" and bool(d.get("qkv_bias", True))),
            mlp_bias=bool(d.get("mlp_bias", False)),
            sliding_window=sliding,
            layer_types=layer_types,
            hidden_act=act,
            qk_norm=model_type in ("qwen3", "gemma3_text", "qwen3_moe"),
            norm_unit_offset=gemma,
            embed_scale=gemma,
            sandwich_norms=model_type in ("gemma2", "gemma3_text"),
            query_pre_attn_scalar=d.get("query_pre_attn_scalar") if model_type in ("gemma2", "gemma3_text") else None,
            attn_logit_softcapping=d.get("attn_logit_softcapping", 50.0 if model_type == "gemma2" else None),
            final_logit_softcapping=d.get("final_logit_softcapping", 30.0 if model_type == "gemma2" else None),
            local_rope_theta=local_theta,
            fused_projections=model_type == "phi3",
            model_type=model_type,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=d.get("pad_token_id"),
            **moe,
        )


def _attention_layout(d: dict, model_type: str) -> tuple[int | None, tuple[str, ...] | None]:
    """``(sliding_window, layer_types)`` as transformers derives them for ``model_type``: from
    ``layer_types`` when the config has it (transformers 5), else the family's rule."""
    n = d["num_hidden_layers"]
    window = d.get("sliding_window")
    if model_type in ("qwen2_moe", "qwen3_moe"):  # from_hf refuses use_sliding_window
        return None, None
    if model_type in ("qwen2", "qwen3"):  # a window only with use_sliding_window, from max_window_layers on
        window = window if d.get("use_sliding_window", False) else None
        default = ["sliding_attention" if window and i >= d.get("max_window_layers", 28) else "full_attention"
                   for i in range(n)]  # fmt: skip
    elif model_type == "gemma2":
        window = d.get("sliding_window", 4096)  # transformers' default
        default = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    elif model_type == "gemma3_text":
        window = d.get("sliding_window", 4096)
        pattern = d.get("sliding_window_pattern", 6)
        default = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    elif model_type in ("mistral", "phi3", "mixtral"):  # every layer (transformers ignores layer_types)
        window = window if d.get("use_sliding_window", True) else None
        return window, None
    else:  # llama, gemma: no window
        window, default = None, ["full_attention"] * n
    types = tuple(d.get("layer_types") or default)
    if "sliding_attention" not in types or not window:  # no window: every layer attends to all
        return None, None
    return window, types


# --- rotary embeddings ------------------------------------------------------------------------


def rope_inv_freq(config: LlamaConfig, local: bool = False) -> np.ndarray:
    """float32 ``[Dh/2]`` inverse frequencies, with linear or llama3 scaling applied; ``local``: the
    sliding layers' (``local_rope_theta``, unscaled)."""
    dim = config.dim_head
    theta = config.local_rope_theta if local else config.rope_theta
    inv = (1.0 / (np.float32(theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)))).astype(np.float32)
    s = {} if local else config.rope_scaling_dict
    kind = s.get("rope_type", "default")
    if kind == "linear":
        return (inv / np.float32(s["factor"])).astype(np.float32)
    if kind == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """Rotate ``x [B, S, heads, Dh]`` by ``positions [B, S]`` (rotate-half convention, float32)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, S, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, S, 1, Dh]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


# --- modules ----------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm in float32. LLaMA's casts the normalized value to ``dtype`` and scales by ``w``;
    Gemma's (``unit_offset``) scales by ``1 + w`` in float32 and casts after (its ``w`` starts at 0)."""

    eps: float
    dtype: Any = jnp.bfloat16
    unit_offset: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = jnp.zeros if self.unit_offset else jnp.ones
        weight = self.variable("base", "weight", lambda: init((x.shape[-1],), self.dtype)).value
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:
            return (normed * (1.0 + weight.astype(jnp.float32))).astype(self.dtype)
        return weight.astype(self.dtype) * normed.astype(self.dtype)


def _norm(cfg: LlamaConfig, dtype, name: str) -> RMSNorm:
    return RMSNorm(cfg.rms_norm_eps, dtype, cfg.norm_unit_offset, name=name)


def softcap(x: Array, cap: float | None) -> Array:
    """Gemma 2's soft-capping ``cap * tanh(x / cap)`` (identity for ``cap=None``)."""
    return x if cap is None else jnp.tanh(x / cap) * cap


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """What every block of the decoder is built with, beside the architecture: one frozen (hashable)
    struct passed down instead of five attributes on every module (flax lm1b's TransformerConfig).

    ``impl`` is the kernels' static choice (a name or a :class:`qlora_jax.kernels.Dispatch`).
    """

    config: LlamaConfig
    lora: LoRAConfig | None = None
    quant: QuantConfig | None = None
    dtype: Any = jnp.bfloat16
    impl: Any = "auto"
    decode: bool = False
    attention: str = "chunked"  # in ATTENTION
    attention_chunk: int = ATTENTION_CHUNK
    moe_dispatch: str = "sorted"  # in qlora_jax.nn.moe.MOE_DISPATCH

    def linear(self, name: str, features: int, bias: bool = False) -> LoRADense:
        """The ``name`` linear (``q_proj``, ...): an adapter when ``lora.targets`` names it."""
        adapter = self.lora if self.lora is not None and name in self.lora.targets else None
        return LoRADense(features, lora=adapter, quant=self.quant, use_bias=bias, dtype=self.dtype, impl=self.impl,
                         name=name)  # fmt: skip


class Attention(nn.Module):
    settings: ModelSettings

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        key_mask: Array,
        deterministic: bool,
        segment_ids: Array | None = None,
        sliding: Array | bool = False,
    ) -> Array:
        """``sliding``: whether this layer attends within ``sliding_window`` only (a traced bool
        under a scan over layers, where sliding and global layers alternate)."""
        cfg, dtype = self.settings.config, self.settings.dtype
        b, s, _ = x.shape
        h, hkv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_head
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        linear = self.settings.linear
        if cfg.fused_projections:  # Phi-3: one linear, rows queries | keys | values
            qkv = linear("qkv_proj", (h + 2 * hkv) * dh, qkv_bias)(x, deterministic)
            q, k, v = jnp.split(qkv, [h * dh, (h + hkv) * dh], axis=-1)
        else:
            q = linear("q_proj", h * dh, qkv_bias)(x, deterministic)
            k = linear("k_proj", hkv * dh, qkv_bias)(x, deterministic)
            v = linear("v_proj", hkv * dh, qkv_bias)(x, deterministic)
        q, k, v = q.reshape(b, s, h, dh), k.reshape(b, s, hkv, dh), v.reshape(b, s, hkv, dh)
        if cfg.qk_norm:  # Qwen3, Gemma 3: each head's queries and keys, before rotary
            q, k = _norm(cfg, dtype, "q_norm")(q), _norm(cfg, dtype, "k_norm")(k)

        def rope(x):
            out = apply_rope(x, positions, rope_inv_freq(cfg))
            if cfg.local_rope_theta is None:
                return out
            return jnp.where(sliding, apply_rope(x, positions, rope_inv_freq(cfg, local=True)), out)

        q, k = rope(q), rope(k)

        q_pos = positions  # [B, S]
        if self.settings.decode:  # append to the cache; attend over everything written so far
            ck = self.variable("cache", "cached_key", jnp.zeros, (b, 0, hkv, dh), dtype)
            cv = self.variable("cache", "cached_value", jnp.zeros, (b, 0, hkv, dh), dtype)
            cm = self.variable("cache", "key_mask", jnp.zeros, (b, 0), jnp.bool_)
            cp = self.variable("cache", "key_pos", jnp.zeros, (b, 0), jnp.int32)
            idx = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
            i = idx.value
            ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), (0, i, 0, 0))
            cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), (0, i, 0, 0))
            cm.value = jax.lax.dynamic_update_slice(cm.value, key_mask, (0, i))
            cp.value = jax.lax.dynamic_update_slice(cp.value, positions.astype(jnp.int32), (0, i))
            idx.value = i + s
            k, v, key_mask, k_pos = ck.value, cv.value, cm.value, cp.value
            written = jnp.arange(k.shape[1]) < i + s  # [T]
            key_mask = key_mask & written[None, :]
        else:
            k_pos = positions

        # causal by position, padding, and a sliding layer's window; packed rows: within an example only
        # (its positions restart, so causality by position holds inside it)
        qg = q.reshape(b, s, hkv, h // hkv, dh)
        scale = (cfg.query_pre_attn_scalar or dh) ** -0.5
        cap, window = cfg.attn_logit_softcapping, cfg.sliding_window
        if self.settings.decode or self.settings.attention == "reference":  # decode: a few queries, the cache
            allowed = attention.allowed_keys(q_pos, k_pos, key_mask, segment_ids, segment_ids, sliding, window)
            out = attention.reference_attention(qg, k, v, allowed, scale=scale, cap=cap)
        elif self.settings.attention == "dot_product":  # cuDNN flash attention on a GPU
            allowed = attention.allowed_keys(q_pos, k_pos, key_mask, segment_ids, segment_ids, sliding, window)
            out = attention.dot_product_attention(qg, k, v, allowed, scale=scale)
        else:  # memory O(S), not O(S^2): keys in chunks (qlora_jax.nn.attention)
            out = attention.chunked_attention(
                qg, k, v, q_pos, k_pos, key_mask, segment_ids, segment_ids, sliding, window=window, scale=scale,
                cap=cap, chunk=self.settings.attention_chunk,
            )  # fmt: skip
        out = out.reshape(b, s, h * dh).astype(dtype)
        return linear("o_proj", cfg.hidden_size, cfg.attention_bias)(out, deterministic)


class MLP(nn.Module):
    settings: ModelSettings
    intermediate_size: int | None = None  # None: the config's (Qwen2-MoE's shared expert has its own)

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        cfg, dtype, linear = self.settings.config, self.settings.dtype, self.settings.linear
        f = self.intermediate_size or cfg.intermediate_size
        if cfg.fused_projections:  # Phi-3: one linear, rows gate | up
            gate, up = jnp.split(linear("gate_up_proj", 2 * f, cfg.mlp_bias)(x, deterministic), 2, axis=-1)
        else:
            gate = linear("gate_proj", f, cfg.mlp_bias)(x, deterministic)
            up = linear("up_proj", f, cfg.mlp_bias)(x, deterministic)
        act = ACTIVATIONS[cfg.hidden_act]  # SwiGLU, or Gemma's GeGLU
        hidden = (act(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(dtype)
        return linear("down_proj", cfg.hidden_size, cfg.mlp_bias)(hidden, deterministic)


class SparseMoE(nn.Module):
    """Mixtral's / Qwen-MoE's MLP (:mod:`qlora_jax.nn.moe`): the router ``gate``, the ``experts``
    and Qwen2-MoE's gated ``shared_expert``. ``__call__(x [B, S, D], mask [B, S])`` ->
    ``(y [B, S, D], RouterStats)`` (``mask``: the tokens the load-balancing loss counts)."""

    settings: ModelSettings

    @nn.compact
    def __call__(self, x: Array, mask: Array, deterministic: bool) -> tuple[Array, moe.RouterStats]:
        s = self.settings
        cfg, dtype = s.config, s.dtype
        b, t, d = x.shape
        tokens = x.reshape(b * t, d).astype(dtype)
        logits = moe.Router(cfg.num_experts, dtype, name="gate")(tokens)  # [N, E]
        weights, experts, probs = moe.route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        y = moe.Experts(
            cfg.num_experts, cfg.moe_hidden_size, ACTIVATIONS[cfg.hidden_act], cfg.expert_names, s.lora, s.quant, dtype,
            s.moe_dispatch, name="experts",
        )(tokens, weights, experts, deterministic)  # fmt: skip
        if cfg.shared_expert_intermediate_size:  # Qwen2-MoE: a dense expert for every token, sigmoid-gated
            shared = MLP(s, cfg.shared_expert_intermediate_size, name="shared_expert")(tokens, deterministic)
            gate = s.linear(SHARED_EXPERT_GATE, 1)(tokens, deterministic)
            y = y + jax.nn.sigmoid(gate.astype(jnp.float32)) * shared.astype(jnp.float32)
        return y.astype(dtype).reshape(b, t, d), moe.router_stats(probs, experts, mask.reshape(-1))


class DecoderLayer(nn.Module):
    settings: ModelSettings

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        key_mask: Array,
        deterministic: bool = True,
        segment_ids: Array | None = None,
        sliding: Array | bool = False,
    ) -> Array:
        """-> ``(x, RouterStats or None)``: a MoE layer's router statistics, else None."""
        cfg, dtype = self.settings.config, self.settings.dtype
        h = _norm(cfg, dtype, "input_layernorm")(x)
        h = Attention(self.settings, name="self_attn")(h, positions, key_mask, deterministic, segment_ids, sliding)
        if cfg.num_experts:
            x = x + h
            y, stats = SparseMoE(self.settings, name=cfg.mlp_module)(
                _norm(cfg, dtype, "post_attention_layernorm")(x), key_mask, deterministic
            )
            return x + y, stats
        if not cfg.sandwich_norms:
            x = x + h
            return x + MLP(self.settings, name="mlp")(
                _norm(cfg, dtype, "post_attention_layernorm")(x), deterministic
            ), None
        # Gemma 2/3: the attention output and the MLP's input and output are normed too
        x = x + _norm(cfg, dtype, "post_attention_layernorm")(h)
        h = MLP(self.settings, name="mlp")(_norm(cfg, dtype, "pre_feedforward_layernorm")(x), deterministic)
        return x + _norm(cfg, dtype, "post_feedforward_layernorm")(h), None


class LlamaForCausalLM(nn.Module):
    """The causal LM. ``__call__(input_ids [B, S], attention_mask=None) -> logits [B, S, V]`` (fp32).

    Packed rows (several examples in one row) pass ``segment_ids [B, S]`` (1, 2, ... per example,
    0 for padding) and ``positions`` restarting at 0 for each example: attention then stays within
    an example (block-diagonal causal).

    Attributes:
      config: the architecture.
      lora: adapters for the linears named in ``lora.targets`` (None: no adapters).
      quant: storage of the linear weights this module initializes (None: ``dtype`` arrays).
      dtype: compute dtype (bf16; fp32 for parity checks).
      remat: recompute each decoder block in the backward pass (gradient checkpointing).
      remat_policy: a name in ``REMAT_POLICIES``: what a rematerialized block may keep.
      impl: the kernels for quantized linears: a :class:`qlora_jax.kernels.Dispatch` (the static
        per-device choice the trainer passes down) or an impl name; ``"auto"`` resolves the
        device's table when traced.
      decode: KV-cache mode (see :func:`init_cache` and :func:`qlora_jax.nn.generate`).
      attention: ``"chunked"`` (keys ``attention_chunk`` at a time with an online softmax: memory
        ``O(S)``; :func:`qlora_jax.nn.attention.chunked_attention`), ``"reference"`` (the whole
        ``[S, S]`` score matrix) or ``"dot_product"`` (``jax.nn.dot_product_attention``: cuDNN flash
        attention on a GPU where cuDNN takes it, else XLA's whole matrix; no soft-capping). Decoding
        always uses the reference against the cache.
      scan_layers: run the decoder blocks under ``nn.scan`` (variables under ``"layers"`` with a
        leading ``[L]`` axis), so compile time does not grow with depth; False unrolls them
        (``layers_{i}``), which per-layer storage choices need (:func:`check_scannable`).
        :func:`unstack_layers` / :func:`stack_layers` convert between the two layouts.
    """

    config: LlamaConfig
    lora: LoRAConfig | None = None
    quant: QuantConfig | None = None
    dtype: Any = jnp.bfloat16
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    impl: Any = "auto"
    decode: bool = False
    scan_layers: bool = True
    attention: str = "chunked"
    attention_chunk: int = ATTENTION_CHUNK
    moe_dispatch: str = "sorted"

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        positions: Array | None = None,
        deterministic: bool = True,
        segment_ids: Array | None = None,
    ) -> Array:
        cfg = self.config
        if self.lora is not None:
            unknown = sorted(set(self.lora.targets) - set(cfg.linear_names))
            if unknown:
                raise ValueError(f"LoRA targets {unknown} name no linear of this {cfg.model_type} model; its linears: "
                                 f"{cfg.linear_names}")  # fmt: skip
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.bool_)
        key_mask = attention_mask.astype(jnp.bool_)  # [B, S]
        if positions is None:  # left padding: count only real tokens
            positions = jnp.maximum(jnp.cumsum(key_mask, axis=-1) - 1, 0).astype(jnp.int32)

        embed = _Embed(cfg.vocab_size, cfg.hidden_size, self.dtype, name="embed_tokens")
        x = embed(input_ids)  # [B, S, D]
        if cfg.embed_scale:  # Gemma: by sqrt(hidden_size), rounded to the embeddings' dtype as transformers does
            x = x * jnp.asarray(math.sqrt(cfg.hidden_size), jnp.float32).astype(x.dtype)
        x = parallel.shard_batch(x)
        sliding = jnp.asarray(cfg.sliding_layers)  # [L]

        if self.remat and self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {tuple(REMAT_POLICIES)}; got {self.remat_policy!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}; got {self.attention!r}")
        if self.attention_chunk < 1:
            raise ValueError(f"attention_chunk must be a positive number of keys; got {self.attention_chunk}")
        if self.attention == "dot_product" and cfg.attn_logit_softcapping is not None:
            raise ValueError(f"attention='dot_product' (jax.nn.dot_product_attention) cannot soft-cap scores; this "
                             f"{cfg.model_type} model has attn_logit_softcapping={cfg.attn_logit_softcapping}: use "
                             "'chunked'")  # fmt: skip
        if self.moe_dispatch not in moe.MOE_DISPATCH:
            raise ValueError(f"moe_dispatch must be one of {moe.MOE_DISPATCH}; got {self.moe_dispatch!r}")
        settings = ModelSettings(
            cfg, self.lora, self.quant, self.dtype, self.impl, self.decode, self.attention, self.attention_chunk,
            self.moe_dispatch,
        )  # fmt: skip
        if self.scan_layers:
            check_scannable(cfg, self.quant)

            def block(layer, x, positions, key_mask, segment_ids, sliding):
                x, stats = layer(x, positions, key_mask, deterministic, segment_ids, sliding)
                return parallel.shard_batch(x), stats

            if self.remat:
                block = nn.remat(block, policy=REMAT_POLICIES[self.remat_policy])
            # one compiled block for all layers: every variable gets a leading [L] axis
            scanned = nn.scan(
                block,
                variable_axes={"base": 0, "params": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
                length=cfg.num_hidden_layers,
            )
            x, stats = scanned(DecoderLayer(settings, name="layers"), x, positions, key_mask, segment_ids, sliding)
            stats = None if stats is None else jax.tree.map(lambda a: jnp.sum(a, axis=0), stats)
        else:
            stats = None
            layer_cls = DecoderLayer
            if self.remat:
                layer_cls = nn.remat(DecoderLayer, policy=REMAT_POLICIES[self.remat_policy], static_argnums=(4,))
            for i in range(cfg.num_hidden_layers):
                layer = layer_cls(settings, name=f"layers_{i}")
                x, layer_stats = layer(x, positions, key_mask, deterministic, segment_ids, sliding[i])
                x = parallel.shard_batch(x)
                if layer_stats is not None:
                    stats = layer_stats if stats is None else jax.tree.map(jnp.add, stats, layer_stats)
        if stats is not None:  # every MoE layer's, summed: apply(..., mutable=["intermediates"]) returns it
            self.sow("intermediates", ROUTER_STATS, stats)
        x = _norm(cfg, self.dtype, "norm")(x)
        if cfg.tie_word_embeddings:
            head = embed.table()
        else:
            head = _LMHead(cfg.vocab_size, cfg.hidden_size, self.dtype, name="lm_head")()
        logits = jnp.einsum("bsd,vd->bsv", x, head.astype(self.dtype), preferred_element_type=jnp.float32)
        return softcap(logits, cfg.final_logit_softcapping)


class _Embed(nn.Module):
    vocab_size: int
    features: int
    dtype: Any

    def setup(self):
        self.embedding = self.variable(
            "base",
            "embedding",
            lambda: (jax.random.normal(self.make_rng("params"), (self.vocab_size, self.features)) * 0.02).astype(
                self.dtype
            ),
        )

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding.value, ids, axis=0).astype(self.dtype)

    def table(self) -> Array:
        return self.embedding.value


class _LMHead(nn.Module):
    vocab_size: int
    features: int
    dtype: Any

    @nn.compact
    def __call__(self) -> Array:
        return self.variable(
            "base",
            "kernel",
            lambda: (jax.random.normal(self.make_rng("params"), (self.vocab_size, self.features)) * 0.02).astype(
                self.dtype
            ),
        ).value


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=jnp.bfloat16, *, scan_layers: bool = True) -> dict:
    """An empty KV cache for ``batch`` sequences of up to ``max_len`` tokens (the ``"cache"``
    collection), in the layout of a model with ``scan_layers``."""
    hkv, dh = config.num_key_value_heads, config.dim_head
    layer = {
        "self_attn": {
            "cached_key": jnp.zeros((batch, max_len, hkv, dh), dtype),
            "cached_value": jnp.zeros((batch, max_len, hkv, dh), dtype),
            "key_mask": jnp.zeros((batch, max_len), jnp.bool_),
            "key_pos": jnp.zeros((batch, max_len), jnp.int32),
            "index": jnp.array(0, jnp.int32),
        }
    }
    if scan_layers:
        return {"layers": jax.tree.map(lambda a: jnp.broadcast_to(a, (config.num_hidden_layers, *a.shape)), layer)}
    return {f"layers_{i}": jax.tree.map(jnp.copy, layer) for i in range(config.num_hidden_layers)}


# --- layer layouts ----------------------------------------------------------------------------

STACKED = "layers"  # the scanned layout's key: every leaf has a leading [num_hidden_layers] axis


def is_stacked(tree: dict) -> bool:
    return STACKED in tree


def unstack_layers(tree: dict) -> dict:
    """A collection (``frozen``, ``params``, ``cache`` or optimizer moments of the same shape) in the
    scanned layout -> the unrolled one: ``layers`` [L, ...] becomes ``layers_0`` ... ``layers_{L-1}``.
    Checkpoint formats (transformers, PEFT, GGUF) name layers this way. An unrolled tree is
    returned as it is."""
    if not is_stacked(tree):
        return tree
    stacked = tree[STACKED]
    leaves = jax.tree.leaves(stacked)
    n = leaves[0].shape[0] if leaves else 0
    out = {k: v for k, v in tree.items() if k != STACKED}
    for i in range(n):
        out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
    return out


def unstack_experts(tree: dict) -> dict:
    """A collection in the unrolled layout -> one subtree per expert, as checkpoints name them:
    ``experts.gate_proj.kernel`` ``[E, ...]`` becomes ``experts.{e}.gate_proj.kernel`` (leaves of
    every MoE expert linear, :class:`qlora_jax.nn.moe.ExpertLinear`; other leaves as they are)."""
    out = {}
    for path, v in traverse_util.flatten_dict(tree).items():
        if moe.is_expert_path(path, stacked=True):
            *head, linear, leaf = path
            n = (v.packed if isinstance(v, quant.QuantizedTensor) else v).shape[0]
            for e in range(n):
                out[(*head, str(e), linear, leaf)] = jax.tree.map(lambda a, e=e: a[e], v)
        else:
            out[path] = v
    return traverse_util.unflatten_dict(out)


def stack_experts(tree: dict) -> dict:
    """The inverse of :func:`unstack_experts`: ``experts.{e}.gate_proj.kernel`` subtrees (experts
    0..E-1, alike) stacked into ``experts.gate_proj.kernel`` ``[E, ...]``."""
    out, groups = {}, {}
    for path, v in traverse_util.flatten_dict(tree).items():
        if moe.is_expert_path(path, stacked=False):
            *head, e, linear, leaf = path
            groups.setdefault((*head, linear, leaf), {})[int(e)] = v
        else:
            out[path] = v
    for path, by_expert in groups.items():
        missing = sorted(set(range(max(by_expert) + 1)) - set(by_expert))
        if missing:
            *head, linear, leaf = path
            raise ValueError(f"no {leaf} for experts {missing} of {'.'.join(head)}.{linear}")
        out[path] = stack_trees([by_expert[e] for e in sorted(by_expert)], what="experts")
    return traverse_util.unflatten_dict(out)


def stack_layers(tree: dict) -> dict:
    """The inverse of :func:`unstack_layers`: ``layers_{i}`` subtrees (identical structure and
    storage) stacked along a new leading axis under ``layers``."""
    names = sorted((k for k in tree if k.startswith("layers_")), key=lambda k: int(k.removeprefix("layers_")))
    if not names:
        return tree
    if names != [f"layers_{i}" for i in range(len(names))]:
        raise ValueError(f"layers must be numbered 0..{len(names) - 1}; got {names}")
    out = {k: v for k, v in tree.items() if not k.startswith("layers_")}
    out[STACKED] = stack_trees([tree[k] for k in names], what="layers")
    return out


def stack_trees(trees: list, what: str = "layers"):
    """Stack same-structured trees leaf by leaf (numpy leaves on the host, jax arrays on device)."""
    structures = {jax.tree.structure(t) for t in trees}
    if len(structures) != 1:
        raise ValueError(
            f"{what} differ in structure or storage (e.g. one kept in 16 bits or without double quantization) "
            "and cannot be stacked: use unrolled layers (config.model.scan_layers=False)"
        )

    def stack(*xs):
        return np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack(xs)

    return jax.tree.map(stack, *trees)


def layer_specific_storage(config: LlamaConfig, quant: QuantConfig | None) -> str | None:
    """The first linear (``mlp.down_proj``) that ``quant``'s ``skip_modules`` / ``no_double_quant``
    store differently in different layers (e.g. ``layers.3.mlp.down_proj``), or None."""
    if quant is None or not (quant.skip_modules or quant.no_double_quant):
        return None
    linears = config.linear_names
    split = linears.index("o_proj") + 1  # attention's linears end with o_proj
    mlp = config.mlp_module
    modules = [f"self_attn.{n}" for n in linears[:split]]
    if config.num_experts:  # every expert's linear, its shared expert's and that one's gate
        modules += [f"{mlp}.experts.{n}" for n in config.expert_names]
        if config.shared_expert_intermediate_size:
            modules += [f"{mlp}.shared_expert.{n}" for n in LINEAR_NAMES[4:]] + [f"{mlp}.{SHARED_EXPERT_GATE}"]
    else:
        modules += [f"mlp.{n}" for n in linears[split:]]
    for module in modules:
        storages = {quant.for_module(f"model.layers.{i}.{module}") for i in range(config.num_hidden_layers)}
        if len(storages) > 1:
            return module
    return None


def check_scannable(config: LlamaConfig, quant: QuantConfig | None) -> None:
    """Scanned layers share one storage per linear: refuse a QuantConfig that picks some layers but
    not others (:func:`layer_specific_storage`). :func:`qlora_jax.checkpoints.load_pretrained`
    unrolls such a model instead."""
    linear = layer_specific_storage(config, quant)
    if linear is not None:
        raise ValueError(
            f"quant skip_modules={quant.skip_modules} / no_double_quant={quant.no_double_quant} store {linear} "
            "differently in different layers; scanned layers share one storage per linear: set "
            "config.model.scan_layers=False (unrolled layers; compile time grows with depth)"
        )
