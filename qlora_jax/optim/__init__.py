"""Optimizers: host-paged optax state, 8-bit Adam moments, float32 moments for bf16 parameters."""

from qlora_jax.optim.adam8bit import ScaleByAdam8bitState, adamw_8bit, scale_by_adam_8bit
from qlora_jax.optim.builder import OPTIMIZERS, Optimizer, OptimizerConfig, build_optimizer
from qlora_jax.optim.moments import adamw, float32_moments
from qlora_jax.optim.paged import PagedState, memory_report, paged, state_bytes_by_memory_kind

__all__ = [
    "OPTIMIZERS",
    "Optimizer",
    "OptimizerConfig",
    "PagedState",
    "ScaleByAdam8bitState",
    "adamw",
    "adamw_8bit",
    "build_optimizer",
    "float32_moments",
    "memory_report",
    "paged",
    "scale_by_adam_8bit",
    "state_bytes_by_memory_kind",
]
