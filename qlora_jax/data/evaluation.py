"""Held-out generations for any data: prompts, targets, stop tokens, and exact-match scores.

Each evaluation example becomes a :class:`GenerationItem`: the prompt the model answers (a
conversation's messages before its last assistant answer, rendered with the generation prompt; a
(source, target) example's source after the tokenizer's prefix; the first half of a raw text),
the target text, and the prompt as text for ``samples.jsonl``. Scores: :func:`exact_match` after
stripping whitespace, and its ``normalize=True`` variant (lower case, punctuation, articles and
extra whitespace removed, as SQuAD's evaluation normalizes answers).
"""

from __future__ import annotations

import dataclasses
import re
import string

from qlora_jax.data.chat import render_conversation, tokenize_conversation
from qlora_jax.data.jsonl import Conversation


@dataclasses.dataclass(frozen=True)
class GenerationItem:
    prompt_ids: tuple[int, ...]
    target: str
    prompt: str  # as text, for samples.jsonl


def generation_items(
    examples, tokenizer, *, max_prompt: int, raw_text: bool = False, chat_template: str | None = None
) -> list[GenerationItem]:
    """The prompts and targets of ``examples`` (conversations that end with an assistant answer,
    or (source, target) examples); ``raw_text``: the examples are plain text (``data.format='text'``),
    whose first half is the prompt. Prompts longer than ``max_prompt`` tokens keep their end."""
    items = []
    for ex in examples:
        if isinstance(ex, Conversation):
            messages = list(ex.messages)
            if messages[-1]["role"] != "assistant" or len(messages) < 2:
                continue
            text = render_conversation(
                tokenizer, messages[:-1], add_generation_prompt=True, chat_template=chat_template
            )
            ids = list(tokenizer.encode_rendered(text)[0])  # as apply_chat_template, from the one render
            target = messages[-1]["content"]
        elif raw_text:
            tokens = tokenizer.encode(ex.target)
            half = len(tokens) // 2
            ids, text = list(tokenizer.prefix_ids) + tokens[:half], tokenizer.decode(tokens[:half])
            target = tokenizer.decode(tokens[half:])
        else:
            ids, text, target = list(tokenizer.prefix_ids) + tokenizer.encode(ex.source), ex.source, ex.target
        items.append(GenerationItem(tuple(ids[-max_prompt:]), target, text))
    return items


def stop_ids(tokenizer, chat_template: str | None = None) -> tuple[int, ...]:
    """The ids that end an answer: the EOS, and the end-of-turn token the chat template writes after
    an assistant message (Llama-3's ``<|eot_id|>``, ChatML's ``<|im_end|>``) when it is another."""
    stops = [tokenizer.eos_id]
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    try:
        ids, mask = tokenize_conversation(tokenizer, probe, chat_template=chat_template)
    except ValueError:  # a template that refuses this probe (e.g. one that needs a system message)
        return tuple(stops)
    masked = ids[mask]
    if masked.size and int(masked[-1]) in tokenizer.special_ids and int(masked[-1]) not in stops:
        stops.append(int(masked[-1]))
    return tuple(stops)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(predictions: list[str], targets, *, normalize: bool = False) -> float:
    """Fraction of predictions equal to their target (strings, or examples with a ``target``) after
    stripping whitespace, or after :func:`normalize_answer` with ``normalize``."""
    targets = [t if isinstance(t, str) else t.target for t in targets]
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    clean = normalize_answer if normalize else str.strip
    hits = sum(clean(p) == clean(t) for p, t in zip(predictions, targets, strict=True))
    return hits / max(1, len(targets))
