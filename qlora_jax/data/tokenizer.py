"""Tokenizers: Hugging Face ``tokenizer.json`` (via the ``tokenizers`` library) and a built-in
byte-level tokenizer for the offline default.

Both expose ``encode(text) -> list[int]`` (no special tokens), ``decode(ids) -> str``, and the
ids ``bos_id``, ``eos_id``, ``pad_id`` and ``vocab_size``.
"""

from __future__ import annotations

import json
import pathlib

from tokenizers import Tokenizer


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then BOS=256, EOS=257, PAD=258 (vocab 259).

    Needs no files, so the tiny default config runs anywhere; every string round-trips.
    """

    vocab_size = 259
    bos_id, eos_id, pad_id = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

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


def load_tokenizer(path) -> ByteTokenizer | HFTokenizer:
    """The tokenizer of the checkpoint directory ``path``: ``tokenizer.json`` (Hugging Face), or
    ``byte_tokenizer.json`` (written by :meth:`ByteTokenizer.save` for checkpoints this project
    trained from scratch)."""
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


class HFTokenizer:
    """A checkpoint's ``tokenizer.json``; BOS/EOS/PAD from its config files.

    Special ids are read from ``config.json``, then ``generation_config.json``, then
    ``tokenizer_config.json`` (token strings mapped through the vocabulary). A missing pad id
    falls back to EOS, as QLoRA's training script does for LLaMA.
    """

    def __init__(self, path):
        root = pathlib.Path(path)
        file = root / "tokenizer.json" if root.is_dir() else root
        if not file.exists():
            raise ValueError(f"{file}: no tokenizer.json")
        self._tok = Tokenizer.from_file(str(file))
        root = file.parent
        ids: dict[str, int | None] = {"bos": None, "eos": None, "pad": None}
        for name in ("config.json", "generation_config.json"):
            if (root / name).exists():
                cfg = json.loads((root / name).read_text())
                for k in ids:
                    value = cfg.get(f"{k}_token_id")
                    if ids[k] is None and value is not None:
                        ids[k] = value[0] if isinstance(value, list) else value
        if (root / "tokenizer_config.json").exists():
            cfg = json.loads((root / "tokenizer_config.json").read_text())
            for k in ids:
                token = cfg.get(f"{k}_token")
                if isinstance(token, dict):
                    token = token.get("content")
                if ids[k] is None and isinstance(token, str):
                    ids[k] = self._tok.token_to_id(token)
        if ids["eos"] is None:
            raise ValueError(f"{root}: no eos_token_id in config.json/generation_config.json/tokenizer_config.json")
        self.bos_id = ids["bos"]
        self.eos_id = ids["eos"]
        self.pad_id = ids["pad"] if ids["pad"] is not None else ids["eos"]
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)
