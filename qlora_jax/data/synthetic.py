"""A synthetic instruction dataset with exact answers, for the offline default and ablations.

Task families (source -> target): ``add`` ("Q: 37+5=" -> "42"), ``sort`` (digits ascending),
``reverse`` (a lowercase word backwards), ``upper`` (uppercase it). Every example is fixed by
``(seed, index)``, so a dataset is reproducible anywhere; exact-match accuracy scores it. For a
model with a chat template, :func:`as_conversations` makes each one a user question and the
assistant's exact answer.
"""

from __future__ import annotations

import numpy as np

from qlora_jax.data.jsonl import Conversation, Example

FAMILIES = ("add", "sort", "reverse", "upper")
_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


def _one(family: str, rng: np.random.Generator) -> Example:
    if family == "add":
        a, b = (int(v) for v in rng.integers(0, 1000, 2))
        return Example(f"Q: {a}+{b}=\nA: ", str(a + b))
    if family == "sort":
        digits = [str(d) for d in rng.integers(0, 10, int(rng.integers(3, 7)))]
        return Example(f"Q: sort {' '.join(digits)}\nA: ", " ".join(sorted(digits)))
    word = "".join(rng.choice(_LETTERS, int(rng.integers(3, 8))))
    if family == "reverse":
        return Example(f"Q: reverse {word}\nA: ", word[::-1])
    if family == "upper":
        return Example(f"Q: upper {word}\nA: ", word.upper())
    raise ValueError(f"synthetic family must be one of {FAMILIES}; got {family!r}")


def make_examples(n: int, seed: int, families: tuple[str, ...] = FAMILIES) -> list[Example]:
    """``n`` examples cycling through ``families``, deterministic in ``seed``."""
    for f in families:
        if f not in FAMILIES:
            raise ValueError(f"synthetic family must be one of {FAMILIES}; got {f!r}")
    rng = np.random.default_rng(seed)
    return [_one(families[i % len(families)], rng) for i in range(n)]


def as_conversations(examples: list[Example]) -> list[Conversation]:
    """Each ``Q: ... A:`` example as one exchange: the question as the user's message, the exact
    answer as the assistant's (rendered by the model's chat template)."""
    return [
        Conversation(({"role": "user", "content": e.source.removeprefix("Q: ").removesuffix("\nA: ")},
                      {"role": "assistant", "content": e.target}))
        for e in examples
    ]  # fmt: skip
