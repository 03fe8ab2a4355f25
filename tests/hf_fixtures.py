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


def byte_checkpoint(root, name: str):
    """A random float32 checkpoint of fixture ``name``'s architecture with the byte tokenizer (its
    vocabulary and special ids), at ``root / name``: a model_path for the entry point."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from qlora_jax.checkpoints import export_hf, read_config
    from qlora_jax.data import ByteTokenizer
    from qlora_jax.nn import LlamaForCausalLM

    tok = ByteTokenizer()
    cfg = dataclasses.replace(read_config(HF / name)[0], vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                              eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)  # fmt: skip
    base = LlamaForCausalLM(cfg, dtype=jnp.float32).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["base"]
    export_hf(root / name, cfg, base)
    tok.save(root / name)
    return root / name
