"""Tokenize (source, target) pairs and batch them: target-only loss, length grouping, resumable.

A tokenized example is ``[BOS] source [truncated to source_max_len]`` followed by
``target [EOS]`` (truncated to ``target_max_len``); its loss mask covers the target (and the
source when ``train_on_source``). Batches are padded to a multiple of ``pad_multiple`` so a jitted
step sees few distinct shapes. The order is a pure function of ``(seed, epoch)``; the iterator's
position is a small dict that checkpoints carry, so a resumed run reads the same batches.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from qlora_jax.data.jsonl import Example


@dataclasses.dataclass(frozen=True)
class Tokenized:
    ids: np.ndarray  # [L] int32
    loss_mask: np.ndarray  # [L] bool: which tokens are predicted (as targets of the previous one)


@dataclasses.dataclass
class TokenizeReport:
    """What :func:`tokenize` cut and skipped: ``examples`` kept, ``skipped`` (empty targets),
    ``source_cut``/``target_cut`` (examples truncated at ``source_max_len``/``target_max_len``),
    ``tokens_dropped`` in all, and the first cut source's kept text (``source_kept``)."""

    examples: int = 0
    skipped: int = 0
    source_cut: int = 0
    target_cut: int = 0
    tokens_dropped: int = 0
    source_kept: str | None = None

    def warnings(self, split: str, source_max_len: int, target_max_len: int) -> list[str]:
        """What to tell the user before training; empty when nothing was cut."""
        out = []
        if self.target_cut:
            out.append(
                f"{split}: {self.target_cut} of {self.examples} targets were cut at data.target_max_len="
                f"{target_max_len} (their answers lose their end, and the end-of-sequence token): raise it"
            )
        if self.source_cut:
            out.append(
                f"{split}: {self.source_cut} of {self.examples} sources were cut at data.source_max_len="
                f"{source_max_len}, losing their end (an Alpaca prompt's instruction and '### Response:'); the "
                f"first kept only {self.source_kept!r}: raise it"
            )
        if out:
            out.append(f"{split}: {self.tokens_dropped} tokens dropped by truncation in all")
        return out


def tokenize(
    examples: list[Example],
    tokenizer,
    *,
    source_max_len: int,
    target_max_len: int,
    train_on_source: bool = False,
    skip_empty: bool = False,
) -> tuple[list[Tokenized], TokenizeReport]:
    """Tokenize examples; returns ``(tokenized, report)``. An example whose target truncates to
    nothing raises ``ValueError`` (its index), or is skipped and counted with ``skip_empty``."""
    out, report = [], TokenizeReport()
    for i, ex in enumerate(examples):
        full_source = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(ex.source)
        source = full_source[:source_max_len]
        full_target = [*tokenizer.encode(ex.target), tokenizer.eos_id]
        target = full_target[:target_max_len]
        if not ex.target.strip() or target_max_len < 1:
            if not skip_empty:
                raise ValueError(f"example {i}: empty target after truncation (target_max_len={target_max_len})")
            report.skipped += 1
            logging.warning("example %d skipped: empty target", i)
            continue
        if len(source) < len(full_source):
            report.source_cut += 1
            if report.source_kept is None:
                report.source_kept = tokenizer.decode(source)
        report.target_cut += len(target) < len(full_target)
        report.tokens_dropped += len(full_source) - len(source) + len(full_target) - len(target)
        ids = np.asarray(source + target, np.int32)
        mask = np.concatenate([np.full(len(source), train_on_source), np.ones(len(target), bool)])
        out.append(Tokenized(ids, mask))
    report.examples = len(out)
    return out, report


class Batches:
    """Endless, deterministic batches of tokenized examples.

    Args:
      data: tokenized examples.
      batch_size: examples per batch.
      pad_id: the padding token.
      seed: fixes the order of every epoch.
      group_by_length: batch examples of similar length (less padding; QLoRA's group_by_length):
        each epoch shuffles, sorts windows of 50 batches by length, cuts them into batches and
        shuffles the batches.
      pad_multiple: pad the time axis to a multiple of this.
      pad_to: pad every batch to exactly this length instead (one shape: one compilation of
        the jitted step); examples longer than it raise ``ValueError``.
    """

    def __init__(self, data, batch_size, pad_id, *, seed=0, group_by_length=True, pad_multiple=16, pad_to=None):
        if len(data) < batch_size:
            raise ValueError(f"{len(data)} examples cannot fill a batch of {batch_size}")
        self.data, self.batch_size, self.pad_id = data, batch_size, pad_id
        self.seed, self.group_by_length, self.pad_multiple = seed, group_by_length, pad_multiple
        longest = max(len(t.ids) for t in data)
        if pad_to is not None and longest > pad_to:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest example ({longest} tokens)")
        self.pad_to = pad_to
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.data))
        bs = self.batch_size
        if self.group_by_length:
            window = 50 * bs
            lengths = np.array([len(self.data[i].ids) for i in perm])
            parts = []
            for start in range(0, len(perm), window):
                chunk = perm[start : start + window]
                parts.append(chunk[np.argsort(-lengths[start : start + window], kind="stable")])
            perm = np.concatenate(parts)
        batches = [perm[i : i + bs] for i in range(0, len(perm) - bs + 1, bs)]  # drop the ragged tail
        return [batches[i] for i in rng.permutation(len(batches))]

    def state(self) -> dict:
        """The position: restore with :meth:`restore` to continue with the same next batch."""
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._epoch_order(self.epoch)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.index >= len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        idx = self._order[self.index]
        self.index += 1
        return collate([self.data[i] for i in idx], self.pad_id, self.pad_multiple, self.pad_to)


def collate(items: list[Tokenized], pad_id: int, pad_multiple: int = 16, pad_to: int | None = None) -> dict:
    """Right-pad to a common length: ``input_ids``, ``attention_mask``, ``loss_mask`` ``[B, T]``."""
    length = max(len(t.ids) for t in items)
    length = pad_to if pad_to is not None else -(-length // pad_multiple) * pad_multiple
    ids = np.full((len(items), length), pad_id, np.int32)
    attn = np.zeros((len(items), length), bool)
    loss = np.zeros((len(items), length), bool)
    for r, t in enumerate(items):
        ids[r, : len(t.ids)] = t.ids
        attn[r, : len(t.ids)] = True
        loss[r, : len(t.ids)] = t.loss_mask
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}
