"""Instruction data from JSONL files: (source, target) text pairs, or conversations.

Formats (``fmt``):

* ``"alpaca"``: ``instruction``, optional ``input``, ``output``. With ``as_chat=True`` (a model
  with a chat template) a :class:`Conversation` of one user message (the instruction, then the
  input after a blank line) and the assistant's output; otherwise the Alpaca prompt is the source.
* ``"chat"``: ``messages`` (a list of ``{"role", "content"}``, HF / OpenAI style) as a
  :class:`Conversation`; or OASST's ``text`` with ``### Human: ... ### Assistant: ...`` turns as an
  :class:`Example` whose source is everything up to and including the last ``### Assistant:``
  and whose target is the last assistant turn.
* ``"sharegpt"``: ``conversations`` (a list of ``{"from", "value"}``: human/gpt/system) as a
  :class:`Conversation`.
* ``"text"``: raw ``text``; source empty, target the text (language-model training).

Conversations are rendered by the model's own chat template (:mod:`qlora_jax.data.chat`) and
need at least one assistant message. Malformed lines (bytes that are not UTF-8, bad JSON, missing
fields, an empty target, an OASST text ending with a human turn, unknown roles) raise
``ValueError`` naming the file and line, unless ``skip_malformed=True``: then they are skipped,
counted in ``skipped`` and logged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: "
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response: "
)
HUMAN, ASSISTANT = "### Human: ", "### Assistant: "
FORMATS = ("alpaca", "chat", "sharegpt", "text")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "system": "system"}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Example:
    source: str
    target: str


@dataclasses.dataclass(frozen=True)
class Conversation:
    """Messages ``({"role": ..., "content": ...}, ...)`` to render with a chat template."""

    messages: tuple[dict, ...]

    @property
    def target(self) -> str:
        """The last assistant message: what a model prompted with the messages before it should answer."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "assistant")


class MalformedRecord(ValueError):
    pass


def _alpaca(rec: dict, as_chat: bool) -> Example | Conversation:
    for key in ("instruction", "output"):
        if not isinstance(rec.get(key), str):
            raise MalformedRecord(f"missing or non-string field {key!r}")
    extra = rec.get("input") or ""
    if as_chat:
        user = rec["instruction"] + (f"\n\n{extra}" if extra else "")
        return _conversation([{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}])
    prompt = ALPACA_PROMPT if extra else ALPACA_PROMPT_NO_INPUT
    return Example(prompt.format(instruction=rec["instruction"], input=extra), rec["output"])


def _conversation(messages: list) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise MalformedRecord("a conversation must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise MalformedRecord(f"message {i}: needs role system/user/assistant; got {m!r}"[:200])
        if not isinstance(m.get("content"), str):
            raise MalformedRecord(f"message {i} ({m['role']}): content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise MalformedRecord("a conversation needs an assistant message to train on")
    if not any(m["content"].strip() for m in messages if m["role"] == "assistant"):
        raise MalformedRecord("empty target: every assistant message is empty")
    return Conversation(tuple({"role": m["role"], "content": m["content"]} for m in messages))


def _chat(rec: dict, as_chat: bool) -> Example | Conversation:
    if "messages" in rec:
        return _conversation(rec["messages"])
    text = rec.get("text")
    if not isinstance(text, str):
        raise MalformedRecord("needs 'messages' or an OASST 'text' field")
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise MalformedRecord(f"OASST 'text' has no {ASSISTANT.strip()!r} turn")
    target = text[cut + len(ASSISTANT) :]
    if HUMAN.strip() in target:  # the target would hold the human's turn
        raise MalformedRecord(f"OASST 'text' ends with a {HUMAN.strip()!r} turn after its last assistant answer")
    return Example(text[: cut + len(ASSISTANT)], target)


def _sharegpt(rec: dict, as_chat: bool) -> Conversation:
    turns = rec.get("conversations")
    if not isinstance(turns, list):
        raise MalformedRecord("needs a 'conversations' list of {'from', 'value'}")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("from") not in SHAREGPT_ROLES or not isinstance(t.get("value"), str):
            raise MalformedRecord(f"turn {i}: needs 'from' in {sorted(SHAREGPT_ROLES)} and a string 'value'")
        messages.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    return _conversation(messages)


def _text(rec: dict, as_chat: bool) -> Example:
    if not isinstance(rec.get("text"), str):
        raise MalformedRecord("missing or non-string field 'text'")
    return Example("", rec["text"])


_PARSERS = {"alpaca": _alpaca, "chat": _chat, "sharegpt": _sharegpt, "text": _text}


@dataclasses.dataclass
class JsonlDataset:
    """All examples of a JSONL file; ``skipped`` counts malformed lines when skipping."""

    examples: list[Example | Conversation]
    skipped: int = 0


def load_jsonl(path, fmt: str, *, skip_malformed: bool = False, as_chat: bool = False) -> JsonlDataset:
    """The examples of a JSONL file in format ``fmt`` (see the module docstring); ``as_chat`` turns
    Alpaca records into conversations for a model with a chat template."""
    if fmt not in FORMATS:
        raise ValueError(f"data format must be one of {FORMATS}; got {fmt!r}")
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such data file")
    parse = _PARSERS[fmt]
    examples, skipped = [], 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise MalformedRecord(
                        f"not UTF-8: byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line"
                    ) from None
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MalformedRecord(f"invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(rec, dict):
                    raise MalformedRecord("a line must be a JSON object")
                ex = parse(rec, as_chat)
                if not ex.target.strip():
                    raise MalformedRecord("empty target")
            except MalformedRecord as e:
                if not skip_malformed:
                    raise ValueError(f"{path}:{lineno}: {e}") from None
                skipped += 1
                logging.warning("%s:%d: skipped: %s", path, lineno, e)
                continue
            examples.append(ex)
    if not examples:
        raise ValueError(f"{path}: no usable examples ({skipped} malformed lines skipped)")
    return JsonlDataset(examples, skipped)
