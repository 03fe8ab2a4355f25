"""Conversations rendered by each model's own chat template, tokenized, and masked on its assistant turns.

A chat template is the Jinja program a checkpoint ships (``chat_template`` in
``tokenizer_config.json``, or ``chat_template.jinja``) that turns a list of messages
(``{"role": "system" | "user" | "assistant", "content": str}``) into the text the model was
trained on. :func:`apply_chat_template` renders it as transformers' ``apply_chat_template``
does: a sandboxed Jinja environment with ``trim_blocks`` and ``lstrip_blocks``, the
``loopcontrols`` extension, the same globals (``raise_exception``, ``strftime_now``, limited
``dict`` and ``namespace``) and filter (``tojson`` without HTML escaping), the tokenizer's named
special tokens (``bos_token``, ``eos_token``, ...) and ``add_generation_prompt`` as variables;
then it tokenizes the text *without* adding special tokens, since the template writes them
itself (so a BOS is never doubled).

:func:`tokenize_conversation` finds which tokens are the assistant's by rendering, not by
searching for one template's markers: inside a template's ``{% generation %}`` blocks where it
has them, else as the text each assistant message adds to the rendering of the conversation
before it (with the generation prompt), up to and including the end-of-turn token the template
writes after it.

A tokenizer without a template uses :data:`DEFAULT_CHAT_TEMPLATE`, the ``### Human: /
### Assistant:`` format of QLoRA's Guanaco models (OASST), with the EOS token after each answer.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Human: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Assistant: ' + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ raise_exception('the default chat template knows system, user and assistant messages') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant: ' }}{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool")
TRAIN_ON = ("all_assistant", "last_assistant", "all")

# private-use characters around {% generation %} output while spans are tracked (stripped after)
_OPEN, _CLOSE = "\ue010", "\ue011"
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplateError(ValueError):
    """The template refused a conversation (its ``raise_exception``) or could not be rendered."""


class _GenerationBlocks(jinja2.ext.Extension):
    """``{% generation %} ... {% endgeneration %}``: the assistant's own text in templates that mark
    it. Rendered as its body; while spans are tracked, fenced by private-use markers."""

    tags: ClassVar[set[str]] = {"generation"}

    def __init__(self, environment):
        super().__init__(environment)
        environment.extend(track_generation=False)

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_fence"), [], [], body).set_lineno(lineno)

    def _fence(self, caller):
        text = caller()
        return f"{_OPEN}{text}{_CLOSE}" if self.environment.track_generation else text


class _Namespace(jinja2.utils.Namespace):
    """Jinja's ``namespace`` without underscore attributes (no way to reach interpreter internals)."""

    def __init__(*args, **kwargs):
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set namespace attribute {name!r}")


class _Dict:
    """``dict(...)`` and ``dict.fromkeys(...)`` for templates, and nothing else of the type."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, & and ' for HTML: chat templates want the JSON itself
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


def _environment(track: bool) -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlocks, jinja2.ext.loopcontrols]
    )
    env.track_generation = track
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(), namespace=_Namespace)
    return env


_ENVIRONMENTS = {False: _environment(False), True: _environment(True)}


@functools.lru_cache(maxsize=64)
def _compile(source: str, track: bool) -> jinja2.Template:
    try:
        return _ENVIRONMENTS[track].from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse (line {e.lineno}): {e.message}") from None


def check_messages(messages: Sequence[Mapping]) -> list[dict]:
    """The messages as plain dicts, keys whose value is None dropped (as transformers does); a
    ValueError names the first message that is not ``{"role": ..., "content": str}``."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise ValueError(f"a conversation is a non-empty list of messages; got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"message {i} is not a dict: {m!r}")
        if m.get("role") not in ROLES:
            raise ValueError(f"message {i} has role {m.get('role')!r}; roles are {ROLES}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} ({m['role']}) needs string content; got {type(m.get('content')).__name__}")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def render(
    template: str,
    messages: Sequence[Mapping],
    *,
    add_generation_prompt: bool = False,
    special_tokens: Mapping[str, str] | None = None,
    track_generation: bool = False,
    **kwargs,
) -> str:
    """The text ``template`` renders for ``messages``; ``special_tokens`` (``{"bos_token": "<s>", ...}``)
    and ``kwargs`` are template variables. With ``track_generation`` the output of ``{% generation %}``
    blocks is fenced by private-use markers (see :func:`generation_spans`)."""
    variables = {**(special_tokens or {}), **kwargs}
    try:
        return _compile(template, track_generation).render(
            messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **variables
        )
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template refused the conversation: {e}") from None


def generation_spans(fenced: str) -> tuple[str, list[tuple[int, int]]]:
    """Strip the markers of a ``track_generation`` render: ``(text, [(start, end), ...])`` in characters."""
    text, spans, start = [], [], None
    pos = 0
    for piece in re.split(f"([{_OPEN}{_CLOSE}])", fenced):
        if piece == _OPEN:
            start = pos
        elif piece == _CLOSE:
            spans.append((start, pos))
        else:
            text.append(piece)
            pos += len(piece)
    return "".join(text), spans


def template_of(tokenizer, chat_template: str | None = None) -> str:
    """The template to render with: ``chat_template`` if given (a name among the tokenizer's
    templates, a ``.jinja`` file or the text), else the tokenizer's own, else
    :data:`DEFAULT_CHAT_TEMPLATE`."""
    return tokenizer.template(chat_template) or DEFAULT_CHAT_TEMPLATE


def render_conversation(
    tokenizer, messages, add_generation_prompt: bool = False, *, chat_template: str | None = None
) -> str:
    """The text of ``messages`` in the model's template (see the module docstring)."""
    return render(
        template_of(tokenizer, chat_template),
        check_messages(messages),
        add_generation_prompt=add_generation_prompt,
        special_tokens=tokenizer.special_tokens,
    )


def apply_chat_template(
    tokenizer, messages, add_generation_prompt: bool = False, *, chat_template: str | None = None
) -> list[int]:
    """Token ids of ``messages`` rendered by the model's own chat template, as transformers'
    ``apply_chat_template(messages, tokenize=True)`` gives them.

    Args:
      tokenizer: a :class:`~qlora_jax.data.HFTokenizer` (its ``chat_template``, special tokens and
        ``tokenizers`` tokenizer) or :class:`~qlora_jax.data.ByteTokenizer` (the default template).
      messages: ``[{"role": ..., "content": ...}, ...]``.
      add_generation_prompt: end with the header that opens an assistant answer.
      chat_template: a template to use instead of the tokenizer's.

    Raises:
      ValueError naming the bad message; ChatTemplateError when the template refuses it.
    """
    return tokenizer.encode_rendered(
        render_conversation(tokenizer, messages, add_generation_prompt, chat_template=chat_template)
    )[0]


def _prefix_spans(template: str, messages: list[dict], special_tokens) -> tuple[str, list[tuple[int, int]]]:
    """The full text and each assistant message's character span: what the message adds to the
    rendering of the conversation before it (generation prompt included there)."""
    full = render(template, messages, special_tokens=special_tokens)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(template, messages[:i], add_generation_prompt=True, special_tokens=special_tokens) if i else ""
        upto = render(template, messages[: i + 1], special_tokens=special_tokens)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ChatTemplateError(
                f"assistant message {i}: this chat template renders a conversation's beginning differently once "
                "more messages follow, so its assistant turns cannot be found by rendering prefixes; give it "
                "{% generation %} blocks (data.chat_template) or use data.train_on='all'"
            )
        spans.append((len(before), len(upto)))
    return full, spans


def assistant_spans(tokenizer, messages, *, chat_template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """``(text, [(start, end), ...])``: the rendered conversation and, in characters, every
    assistant message's part of it (from ``{% generation %}`` blocks, or by prefix renders)."""
    template = template_of(tokenizer, chat_template)
    messages = check_messages(messages)
    if _GENERATION_TAG.search(template):
        fenced = render(template, messages, special_tokens=tokenizer.special_tokens, track_generation=True)
        return generation_spans(fenced)
    return _prefix_spans(template, messages, tokenizer.special_tokens)


def tokenize_conversation(
    tokenizer, messages, *, train_on: str = "all_assistant", chat_template: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32 [L], loss_mask bool [L])`` of a conversation in the model's template.

    ``train_on``: ``"all_assistant"`` (loss on every assistant message), ``"last_assistant"``
    (the last one only) or ``"all"`` (every token). An assistant message's tokens are its content
    and the end-of-turn token(s) the template writes after it (whitespace after the last special
    token of its span, like ChatML's newline after ``<|im_end|>``, is not part of the answer).
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}; got {train_on!r}")
    if train_on == "all":  # no spans needed: any template renders, even one prefix renders cannot mask
        ids = np.asarray(
            tokenizer.encode_rendered(render_conversation(tokenizer, messages, chat_template=chat_template))[0],
            np.int32,
        )
        return ids, np.ones(len(ids), bool)
    text, spans = assistant_spans(tokenizer, messages, chat_template=chat_template)
    ids, offsets = tokenizer.encode_rendered(text)
    ids = np.asarray(ids, np.int32)
    mask = np.zeros(len(ids), bool)
    if train_on == "last_assistant":
        spans = spans[-1:]
    starts = np.array([o[0] for o in offsets], np.int64).reshape(-1)
    ends = np.array([o[1] for o in offsets], np.int64).reshape(-1)
    special = np.isin(ids, np.asarray(sorted(tokenizer.special_ids), np.int32))
    for s, e in spans:
        inside = np.flatnonzero((starts < e) & (ends > s))
        if inside.size == 0:
            continue
        marks = inside[special[inside]]
        last = marks[-1] if marks.size else inside[-1]
        mask[inside[0] : last + 1] = True
    return ids, mask
