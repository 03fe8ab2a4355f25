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
)


def reference(name: str) -> dict[str, np.ndarray]:
    with np.load(HF / name / "reference.npz") as z:
        return dict(z)
