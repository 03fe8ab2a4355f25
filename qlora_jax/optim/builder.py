"""The one optimizer builder: the train step's, the planner's and notebook 04's optimizer.

One vocabulary, ``config.train``'s: ``optimizer`` is ``adamw``, ``adamw_8bit``, ``paged_adamw``
or ``paged_adamw_8bit``; the learning rate warms up linearly over ``warmup_ratio * steps`` and
then stays (``constant``, the QLoRA recipe) or decays to 0 (``cosine``, ``linear``); gradients
are clipped to ``max_grad_norm`` first.

    opt = build_optimizer(OptimizerConfig.from_config(config.train))
    state = opt.tx.init(params)
    kinds = opt.memory_kinds(params)       # "device" / "pinned_host" per state leaf, no allocation
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from qlora_jax.optim.moments import adamw
from qlora_jax.optim.paged import DEVICE, HOST, PagedState, _leaf_shapes, _map_per_param, paged

OPTIMIZERS = ("paged_adamw", "adamw", "paged_adamw_8bit", "adamw_8bit")
SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """``config.train``'s optimizer keys (defaults: the QLoRA recipe's paged AdamW)."""

    optimizer: str = "paged_adamw"
    learning_rate: float = 2e-4
    steps: int = 1000  # the schedule's length
    warmup_ratio: float = 0.03
    lr_schedule: str = "constant"
    max_grad_norm: float = 0.3
    weight_decay: float = 0.0
    adam_b2: float = 0.999
    paged_min_size: int = 100_000  # paged: state leaves of at least this many elements live on the host
    paged_chunk_bytes: int | None = None  # paged: state brought to the device at once (None: all)

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {self.optimizer!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}; got {self.lr_schedule!r}")

    @classmethod
    def from_config(cls, train) -> OptimizerConfig:
        """From ``config.train`` (a ConfigDict :func:`qlora_jax.train.validate.validate_config` accepted)."""
        return cls(
            optimizer=train.optimizer, learning_rate=train.learning_rate, steps=train.steps,
            warmup_ratio=train.warmup_ratio, lr_schedule=train.lr_schedule, max_grad_norm=train.max_grad_norm,
            weight_decay=train.weight_decay, adam_b2=train.adam_b2, paged_min_size=train.paged_min_size,
            paged_chunk_bytes=train.paged_chunk_bytes or None,
        )  # fmt: skip

    @property
    def is_paged(self) -> bool:
        return self.optimizer.startswith("paged")

    @property
    def eight_bit(self) -> bool:
        return self.optimizer.endswith("8bit")


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """What :func:`build_optimizer` makes: the optax transformation, its schedule and its settings."""

    tx: optax.GradientTransformation
    schedule: Callable[[Any], Any]
    config: OptimizerConfig

    def abstract_state(self, params):
        """``tx.init(params)`` as ShapeDtypeStructs (``params`` may be abstract): nothing is allocated.

        Paged state is traced without its host placement (``jax.eval_shape`` has no memory
        kinds); :meth:`memory_kinds` says where each leaf lives.
        """
        state = jax.eval_shape(self.unpaged.init, params)
        return PagedState(state) if self.config.is_paged else state

    @property
    def unpaged(self) -> optax.GradientTransformation:
        """The transformation that paging wraps (itself when not paged)."""
        return _inner(self.config, self.schedule)

    def memory_kinds(self, params, state=None):
        """The memory kind of every leaf of the optimizer state for ``params``: ``pinned_host`` for
        the per-parameter leaves :func:`~qlora_jax.optim.paged` moves to the host, else ``device``."""
        state = self.abstract_state(params) if state is None else state
        if not self.config.is_paged:
            return jax.tree.map(lambda _: DEVICE, state)
        min_size = self.config.paged_min_size

        def kind(_, leaf):
            return HOST if int(np.prod(leaf.shape)) >= min_size else DEVICE

        marked = _map_per_param(kind, state.inner, jax.tree.structure(params), _leaf_shapes(params))
        return PagedState(jax.tree.map(lambda x: x if isinstance(x, str) else DEVICE, marked))


def learning_rate_schedule(c: OptimizerConfig):
    """Linear warmup over ``round(warmup_ratio * steps)`` steps, then ``c.lr_schedule``."""
    warmup = round(c.warmup_ratio * c.steps)
    after = max(c.steps - warmup, 1)
    decays = {
        "constant": lambda: optax.constant_schedule(c.learning_rate),
        "cosine": lambda: optax.cosine_decay_schedule(c.learning_rate, after),
        "linear": lambda: optax.linear_schedule(c.learning_rate, 0.0, after),
    }
    return optax.join_schedules(
        [optax.linear_schedule(0.0, c.learning_rate, max(warmup, 1)), decays[c.lr_schedule]()], [warmup]
    )


def _inner(c: OptimizerConfig, schedule) -> optax.GradientTransformation:
    adam = adamw(schedule, b2=c.adam_b2, weight_decay=c.weight_decay, eight_bit=c.eight_bit)
    return optax.chain(optax.clip_by_global_norm(c.max_grad_norm), adam)


def build_optimizer(c: OptimizerConfig = OptimizerConfig()) -> Optimizer:
    """``chain(clip_by_global_norm, AdamW or 8-bit AdamW)`` on the warmup schedule, paged if asked."""
    schedule = learning_rate_schedule(c)
    inner = _inner(c, schedule)
    tx = paged(inner, min_size=c.paged_min_size, chunk_bytes=c.paged_chunk_bytes) if c.is_paged else inner
    return Optimizer(tx, schedule, c)
