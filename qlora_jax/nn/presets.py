"""Architectures of published models by name: the LLaMA-1, LLaMA-2 and two MoE shapes, as :class:`LlamaConfig`.

    from qlora_jax.nn import model_config, preset
    cfg = preset("llama-2-70b")  # 80 layers, 64 heads sharing 8 KV heads
    cfg = model_config("/path/to/llama-2-7b-hf")  # a preset name, a config.json or its directory

No weights: what needs only the shapes (:func:`qlora_jax.train.memory.plan`, ``jax.eval_shape``) can use
these without a download.
"""

from __future__ import annotations

import json
import os

from qlora_jax.nn.llama import LlamaConfig


def _llama1(hidden: int, intermediate: int, layers: int, heads: int) -> LlamaConfig:
    # LLaMA-1 (Touvron et al. 2023, table 2): multi-head attention, 2,048 positions, eps 1e-6
    return LlamaConfig(
        vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, rms_norm_eps=1e-6, max_position_embeddings=2048,
        tie_word_embeddings=False,
    )  # fmt: skip


def _llama2(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> LlamaConfig:
    # LLaMA-2 (the meta-llama/Llama-2-*-hf config.json files): 4,096 positions, eps 1e-5
    return LlamaConfig(
        vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-5, max_position_embeddings=4096,
        tie_word_embeddings=False,
    )  # fmt: skip


PRESETS: dict[str, LlamaConfig] = {
    "llama-7b": _llama1(4096, 11008, 32, 32),
    "llama-13b": _llama1(5120, 13824, 40, 40),
    "llama-33b": _llama1(6656, 17920, 60, 52),
    "llama-30b": _llama1(6656, 17920, 60, 52),  # the same model: "30B" in the release, "33B" in the paper
    "llama-65b": _llama1(8192, 22016, 80, 64),
    "llama-2-7b": _llama2(4096, 11008, 32, 32, 32),
    "llama-2-13b": _llama2(5120, 13824, 40, 40, 40),
    "llama-2-70b": _llama2(8192, 28672, 80, 64, 8),  # grouped-query attention
    # mixtures of experts, from their config.json files: 8 experts of 14,336, top-2; 128 of 768, top-8
    "mixtral-8x7b": LlamaConfig(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1e6,
        max_position_embeddings=32768, num_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02,
    ),
    "qwen3-30b-a3b": LlamaConfig(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=40960, qk_norm=True, num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, norm_topk_prob=True, router_aux_loss_coef=0.001,
    ),
}  # fmt: skip


def preset(name: str) -> LlamaConfig:
    """The architecture of a published model by name (case-insensitive), e.g. ``"llama-7b"``; a
    ValueError listing the names for another."""
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"no model preset {name!r}; the presets: {sorted(PRESETS)}") from None


def model_config(name_or_path: str) -> LlamaConfig:
    """A preset name (:data:`PRESETS`, case-insensitive), or an HF ``config.json`` (or a directory
    holding one)."""
    if name_or_path.lower() in PRESETS:
        return PRESETS[name_or_path.lower()]
    path = os.path.join(name_or_path, "config.json") if os.path.isdir(name_or_path) else name_or_path
    if not os.path.isfile(path):
        raise ValueError(f"--model: {name_or_path!r} is neither a built-in ({sorted(PRESETS)}) nor a config.json")
    with open(path) as fp:
        return LlamaConfig.from_hf(json.load(fp), source=path)
