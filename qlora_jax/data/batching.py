"""Tokenize examples and batch them: target-only loss, length grouping or packing, resumable.

A tokenized :class:`~qlora_jax.data.Example` is the tokenizer's prefix (what its post-processor
puts before a text: Llama's BOS, nothing for ChatML models), the source truncated to
``source_max_len``, then ``target [EOS]`` truncated to ``target_max_len``; its loss mask covers the
target (and the source when ``train_on_source``). A :class:`~qlora_jax.data.Conversation` is
rendered by the model's chat template (:func:`~qlora_jax.data.tokenize_conversation`), masked
on its assistant turns, and kept within ``source_max_len + target_max_len`` tokens by dropping
whole turns from its end first. Batches are padded to a multiple of ``pad_multiple`` (or to
``pad_to``) so a jitted step sees few distinct shapes; :class:`PackedBatches` instead fills each
row with several examples (segment ids and restarting positions keep them apart). The order is a
pure function of ``(seed, epoch)``; the iterator's position is a small dict that checkpoints
carry, so a resumed run reads the same batches.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from qlora_jax.data.chat import tokenize_conversation
from qlora_jax.data.jsonl import Conversation, Example


@dataclasses.dataclass(frozen=True)
class Tokenized:
    ids: np.ndarray  # [L] int32
    loss_mask: np.ndarray  # [L] bool: which tokens are predicted (as targets of the previous one)


@dataclasses.dataclass
class TokenizeReport:
    """What :func:`tokenize` cut and skipped: ``examples`` kept, ``skipped`` (nothing left to train
    on), ``source_cut``/``target_cut`` (examples truncated at ``source_max_len``/``target_max_len``),
    ``turns_dropped`` (conversations shortened by whole turns) and ``conversations_cut`` (cut
    inside a turn), ``tokens_dropped`` in all, and the first cut source's kept text."""

    examples: int = 0
    skipped: int = 0
    source_cut: int = 0
    target_cut: int = 0
    turns_dropped: int = 0
    conversations_cut: int = 0
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
        limit = source_max_len + target_max_len
        if self.turns_dropped:
            out.append(
                f"{split}: {self.turns_dropped} conversations lost their last turns to fit data.source_max_len + "
                f"data.target_max_len = {limit} tokens"
            )
        if self.conversations_cut:
            out.append(
                f"{split}: {self.conversations_cut} conversations were cut inside a turn at {limit} tokens (their "
                "first exchange alone is longer): raise data.source_max_len or data.target_max_len"
            )
        if self.skipped:
            out.append(f"{split}: {self.skipped} examples skipped (nothing left to train on)")
        if out and self.tokens_dropped:
            out.append(f"{split}: {self.tokens_dropped} tokens dropped by truncation in all")
        return out


def _shorten(messages: list[dict]) -> list[dict] | None:
    """The conversation without its last exchange (from its last user message on), if an
    assistant message remains before that; else None."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    for cut in reversed(users):
        if any(m["role"] == "assistant" for m in messages[:cut]):
            return messages[:cut]
    return None


def _tokenize_conversation(conv: Conversation, tokenizer, limit: int, train_on: str, chat_template, report):
    messages = list(conv.messages)
    ids, mask = tokenize_conversation(tokenizer, messages, train_on=train_on, chat_template=chat_template)
    full = len(ids)
    shortened = False
    while len(ids) > limit and (fewer := _shorten(messages)) is not None:
        messages, shortened = fewer, True
        ids, mask = tokenize_conversation(tokenizer, messages, train_on=train_on, chat_template=chat_template)
    report.turns_dropped += shortened
    if len(ids) > limit:
        report.conversations_cut += 1
        ids, mask = ids[:limit], mask[:limit]
    report.tokens_dropped += full - len(ids)
    return ids, mask


def tokenize(
    examples: list[Example | Conversation],
    tokenizer,
    *,
    source_max_len: int,
    target_max_len: int,
    train_on_source: bool = False,
    train_on: str = "all_assistant",
    chat_template: str | None = None,
    skip_empty: bool = False,
) -> tuple[list[Tokenized], TokenizeReport]:
    """Tokenize examples (see the module docstring); returns ``(tokenized, report)``. An example with
    nothing left to train on raises ``ValueError`` (its index), or is skipped and counted with
    ``skip_empty``. ``train_on`` and ``chat_template`` apply to conversations, ``train_on_source``
    to (source, target) examples."""
    out, report = [], TokenizeReport()
    for i, ex in enumerate(examples):
        if isinstance(ex, Conversation):
            ids, mask = _tokenize_conversation(
                ex, tokenizer, source_max_len + target_max_len, train_on, chat_template, report
            )
            if not mask[1:].any():  # the first token is never predicted
                if not skip_empty:
                    raise ValueError(f"example {i}: no assistant token left within {source_max_len + target_max_len}")
                report.skipped += 1
                continue
            out.append(Tokenized(np.asarray(ids, np.int32), np.asarray(mask, bool)))
            continue
        full_source = list(tokenizer.prefix_ids) + tokenizer.encode(ex.source)
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
        batch = self._order[self.index]
        self.index += 1
        return self._collate(batch)

    def _collate(self, idx) -> dict[str, np.ndarray]:
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


class PackedBatches(Batches):
    """Endless, deterministic batches of rows that each hold several examples (``data.packing``).

    Each epoch shuffles the examples (as :class:`Batches` does), then packs them first-fit in that
    order: an example goes into the first of the last ``window`` open rows with room for it, or
    opens a new row; rows are ``length`` tokens. Batches are ``batch_size`` consecutive rows (a
    ragged last batch is dropped). Every batch adds ``segment_ids`` (1, 2, ... per example in a
    row, 0 for padding) and ``positions`` (restarting at 0 for each example), so that attention
    stays within an example and each is placed as if it were alone (block-diagonal causal).
    ``state()``/``restore()`` as :class:`Batches`.
    """

    def __init__(self, data, batch_size, pad_id, *, seed=0, length: int, window: int = 64):
        longest = max((len(t.ids) for t in data), default=0)
        if longest > length:
            raise ValueError(f"packing: an example of {longest} tokens does not fit rows of {length}")
        self.data, self.batch_size, self.pad_id, self.seed = data, batch_size, pad_id, seed
        self.length, self.window = length, window
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order(0)
        if not self._order:
            raise ValueError(f"packing: {len(data)} examples fill fewer than the {batch_size} rows of one batch")

    def _epoch_order(self, epoch: int) -> list[list[list[int]]]:
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
        rows: list[list[int]] = []
        room: list[int] = []
        for i in perm:
            n = len(self.data[i].ids)
            first = len(rows) - min(len(rows), self.window)
            slot = next((r for r in range(first, len(rows)) if room[r] >= n), None)
            if slot is None:
                rows.append([])
                room.append(self.length)
                slot = len(rows) - 1
            rows[slot].append(int(i))
            room[slot] -= n
        bs = self.batch_size
        return [rows[i : i + bs] for i in range(0, len(rows) - bs + 1, bs)]

    def _collate(self, rows) -> dict[str, np.ndarray]:
        return collate_packed([[self.data[i] for i in row] for row in rows], self.pad_id, self.length)

    def padding_fraction(self) -> float:
        """The share of this epoch's row tokens that are padding."""
        used = sum(len(self.data[i].ids) for batch in self._order for row in batch for i in row)
        return 1.0 - used / (len(self._order) * self.batch_size * self.length)


def collate_packed(rows: list[list[Tokenized]], pad_id: int, length: int) -> dict:
    """Rows of several examples each, right-padded to ``length``: ``input_ids``, ``attention_mask``,
    ``loss_mask``, ``segment_ids`` and ``positions``, all ``[B, length]``."""
    b = len(rows)
    ids = np.full((b, length), pad_id, np.int32)
    attn = np.zeros((b, length), bool)
    loss = np.zeros((b, length), bool)
    seg = np.zeros((b, length), np.int32)
    pos = np.zeros((b, length), np.int32)
    for r, row in enumerate(rows):
        at = 0
        for k, t in enumerate(row, start=1):
            n = len(t.ids)
            ids[r, at : at + n], loss[r, at : at + n] = t.ids, t.loss_mask
            attn[r, at : at + n], seg[r, at : at + n], pos[r, at : at + n] = True, k, np.arange(n)
            at += n
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss, "segment_ids": seg, "positions": pos}
