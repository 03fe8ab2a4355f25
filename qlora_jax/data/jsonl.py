"""Instruction data from JSONL files, as (source, target) text pairs.

Formats (``fmt``):

* ``"alpaca"``: ``instruction``, optional ``input``, ``output`` — the Alpaca prompt is the source.
* ``"chat"``: ``messages`` (a list of ``{"role", "content"}``, user/assistant turns); or OASST's
  ``text`` with ``### Human: ... ### Assistant: ...`` turns. The source is everything up to and
  including the last ``### Assistant:``, the target is the last assistant turn.
* ``"text"``: raw ``text``; source empty, target the text (language-model training).

Malformed lines (bytes that are not UTF-8, bad JSON, missing fields, an empty target, an OASST text
ending with a human turn) raise ``ValueError`` naming the file and line, unless
``skip_malformed=True``: then they are skipped, counted in ``skipped`` and logged.
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
FORMATS = ("alpaca", "chat", "text")


@dataclasses.dataclass(frozen=True)
class Example:
    source: str
    target: str


class MalformedRecord(ValueError):
    pass


def _alpaca(rec: dict) -> Example:
    for key in ("instruction", "output"):
        if not isinstance(rec.get(key), str):
            raise MalformedRecord(f"missing or non-string field {key!r}")
    extra = rec.get("input") or ""
    prompt = ALPACA_PROMPT if extra else ALPACA_PROMPT_NO_INPUT
    return Example(prompt.format(instruction=rec["instruction"], input=extra), rec["output"])


def _chat(rec: dict) -> Example:
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise MalformedRecord("'messages' must be a non-empty list")
        parts = []
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise MalformedRecord(f"bad message {m!r}: needs role system/user/assistant and content")
            if not isinstance(m.get("content"), str):
                raise MalformedRecord(f"message without string content: {m!r}")
        if msgs[-1]["role"] != "assistant":
            raise MalformedRecord("the last message must be the assistant's (the target)")
        for m in msgs[:-1]:
            parts.append((HUMAN if m["role"] != "assistant" else ASSISTANT) + m["content"])
        return Example("\n".join(parts) + "\n" + ASSISTANT.rstrip(" ") + " ", msgs[-1]["content"])
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


def _text(rec: dict) -> Example:
    if not isinstance(rec.get("text"), str):
        raise MalformedRecord("missing or non-string field 'text'")
    return Example("", rec["text"])


_PARSERS = {"alpaca": _alpaca, "chat": _chat, "text": _text}


@dataclasses.dataclass
class JsonlDataset:
    """All examples of a JSONL file; ``skipped`` counts malformed lines when skipping."""

    examples: list[Example]
    skipped: int = 0


def load_jsonl(path, fmt: str, *, skip_malformed: bool = False) -> JsonlDataset:
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
                ex = parse(rec)
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
