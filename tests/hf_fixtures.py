"""Paths of the transformers-made checkpoints (tests/fixtures/hf, see make_hf_fixtures.py)."""

import pathlib

import numpy as np

HF = pathlib.Path(__file__).parent / "fixtures" / "hf"
VARIANTS = (
    "llama_gqa",
    "mistral",
    "qwen2",
    "llama_tied",
    "llama3_rope",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
)


def reference(name: str) -> dict[str, np.ndarray]:
    with np.load(HF / name / "reference.npz") as z:
        return dict(z)


def nonzero_adapters(params, seed: int = 0, scale: float = 0.2):
    """``params`` with every ``lora_b`` drawn N(0, scale²) (leaf i from ``fold_in(key(seed), i)``)
    instead of PEFT's zeros, so that an adapter moves the logits. Deterministic: the MoE PEFT
    fixtures (make_moe_peft_fixture.py) are adapters made by this from the tiny checkpoints."""
    import jax

    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    key = jax.random.key(seed)
    out = [
        scale * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype) if path[-1].key == "lora_b" else x
        for i, (path, x) in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, out)
