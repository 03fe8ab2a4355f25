"""Data: JSONL formats and malformed input, tokenizers, synthetic tasks, masking, batching."""

import json
import pathlib

import numpy as np
import pytest

from qlora_jax.data import (
    Batches,
    ByteTokenizer,
    Conversation,
    Example,
    HFTokenizer,
    Tokenized,
    exact_match,
    load_jsonl,
    load_tokenizer,
    make_examples,
    tokenize,
)
from qlora_jax.data.jsonl import ALPACA_PROMPT_NO_INPUT

ROOT_FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"


def _write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return p


def test_alpaca_chat_oasst_and_text(tmp_path):
    ds = load_jsonl(
        _write(
            tmp_path, [{"instruction": "Add", "input": "2 2", "output": "4"}, {"instruction": "Hi", "output": "Hello"}]
        ),
        "alpaca",
    )
    assert ds.examples[0].source.endswith("### Instruction:\nAdd\n\n### Input:\n2 2\n\n### Response: ")
    assert ds.examples[1] == Example(ALPACA_PROMPT_NO_INPUT.format(instruction="Hi"), "Hello")
    messages = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    oasst = {"text": "### Human: a### Assistant: b### Human: c### Assistant: d"}
    chat = load_jsonl(_write(tmp_path, [messages, oasst]), "chat")
    assert chat.examples[0] == Conversation(tuple(messages["messages"]))  # rendered by the model's template
    assert chat.examples[1] == Example("### Human: a### Assistant: b### Human: c### Assistant: ", "d")
    assert load_jsonl(_write(tmp_path, [{"text": "abc"}]), "text").examples == [Example("", "abc")]


def test_non_utf8_line_names_file_and_line_and_can_be_skipped(tmp_path):
    """It used to fail the whole load with "UnicodeDecodeError ... position 1996" (no file, no line)."""
    good = json.dumps({"instruction": "ok", "output": "fine"}).encode()
    path = tmp_path / "d.jsonl"
    path.write_bytes(good + b"\n" + b'{"instruction": "caf\xe9", "output": "x"}\n' + good + b"\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not UTF-8: byte 0xe9 at byte 21 of the line"):
        load_jsonl(path, "alpaca")
    ds = load_jsonl(path, "alpaca", skip_malformed=True)
    assert len(ds.examples) == 2 and ds.skipped == 1


def test_oasst_text_ending_with_a_human_turn_is_malformed(tmp_path):
    path = _write(tmp_path, [{"text": "### Human: a### Assistant: b### Human: c"}])
    with pytest.raises(ValueError, match=r"d\.jsonl:1: OASST 'text' ends with a '### Human:' turn after its last"):
        load_jsonl(path, "chat")


@pytest.mark.parametrize(
    "line,match",
    [
        ("{bad json", r"d\.jsonl:2: invalid JSON"),
        ({"instruction": "x"}, r"d\.jsonl:2: missing or non-string field 'output'"),
        ({"instruction": "x", "output": "  "}, r"d\.jsonl:2: empty target"),
        ("[1, 2]", r"d\.jsonl:2: a line must be a JSON object"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, line, match):
    path = _write(tmp_path, [{"instruction": "ok", "output": "fine"}, line])
    with pytest.raises(ValueError, match=match):
        load_jsonl(path, "alpaca")
    ds = load_jsonl(path, "alpaca", skip_malformed=True)
    assert len(ds.examples) == 1 and ds.skipped == 1


def test_bad_format_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="data format must be one of"):
        load_jsonl(tmp_path / "x.jsonl", "xml")
    with pytest.raises(ValueError, match="no such data file"):
        load_jsonl(tmp_path / "x.jsonl", "text")


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "Grüße, 42!"
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text)) < 256 and tok.vocab_size == 259


def test_load_tokenizer_finds_the_saved_byte_tokenizer_and_names_what_is_missing(tmp_path):
    ByteTokenizer().save(tmp_path / "ckpt")
    tok = load_tokenizer(tmp_path / "ckpt")
    assert isinstance(tok, ByteTokenizer) and (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)
    with pytest.raises(ValueError, match=r"no tokenizer.json \(Hugging Face\) or byte_tokenizer.json"):
        load_tokenizer(tmp_path)
    spec = json.loads((tmp_path / "ckpt" / "byte_tokenizer.json").read_text())
    (tmp_path / "ckpt" / "byte_tokenizer.json").write_text(json.dumps({**spec, "eos_id": 2}))
    with pytest.raises(ValueError, match="not a qlora_jax ByteTokenizer spec"):
        load_tokenizer(tmp_path / "ckpt")


def test_hf_tokenizer_reads_special_ids(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3}
    t = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = HFTokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)  # pad falls back to EOS
    assert tok.encode("a b") == [2, 3]
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 3, "pad_token_id": 2}))
    assert (HFTokenizer(tmp_path).eos_id, HFTokenizer(tmp_path).pad_id) == (3, 2)


def test_synthetic_is_deterministic_and_exact():
    a, b = make_examples(40, 7), make_examples(40, 7)
    assert a == b and a != make_examples(40, 8)
    for ex in a:
        q = ex.source
        if "+" in q:
            x, y = q[3:].split("=")[0].split("+")
            assert ex.target == str(int(x) + int(y))
        elif "sort" in q:
            assert ex.target == " ".join(sorted(q.split("sort ")[1].split("\n")[0].split()))
        elif "reverse" in q:
            assert ex.target == q.split("reverse ")[1].split("\n")[0][::-1]
        else:
            assert ex.target == q.split("upper ")[1].split("\n")[0].upper()
    assert exact_match([e.target + " " for e in a], a) == 1.0
    assert exact_match(["x"] * 40, a) == 0.0


def test_target_only_loss_mask_and_truncation():
    tok = ByteTokenizer()
    [t], _ = tokenize([Example("abcdef", "xyz")], tok, source_max_len=4, target_max_len=3)
    assert list(t.ids) == [256, 97, 98, 99, 120, 121, 122]  # BOS + "abc" | "xyz" (EOS cut)
    assert list(t.loss_mask) == [False] * 4 + [True] * 3
    [t], _ = tokenize([Example("ab", "x")], tok, source_max_len=8, target_max_len=8, train_on_source=True)
    assert t.loss_mask.all() and list(t.ids)[-1] == tok.eos_id
    with pytest.raises(ValueError, match="example 0: empty target"):
        tokenize([Example("ab", "")], tok, source_max_len=8, target_max_len=8)
    out, report = tokenize(
        [Example("ab", ""), Example("a", "b")], tok, source_max_len=8, target_max_len=8, skip_empty=True
    )
    assert len(out) == 1 and report.skipped == 1


def test_truncation_is_counted_and_reported():
    """An Alpaca prompt cut at source_max_len=32 kept only "Below is an instruction that de", silently."""
    tok = ByteTokenizer()
    prompt = ALPACA_PROMPT_NO_INPUT.format(instruction="Reverse the word")
    examples = [Example(prompt, "drow"), Example("short", "a long answer here"), Example("ok", "ok")]
    _, report = tokenize(examples, tok, source_max_len=32, target_max_len=8)
    # BOS + 31 bytes kept of the prompt; 9 bytes + EOS of the answer kept of 19
    assert (report.examples, report.source_cut, report.target_cut) == (3, 1, 1)
    assert report.source_kept == prompt[:31] == "Below is an instruction that de"
    assert report.tokens_dropped == (1 + len(prompt) - 32) + (len("a long answer here") + 1 - 8)
    warnings = report.warnings("train split", 32, 8)
    assert warnings[0] == (
        "train split: 1 of 3 targets were cut at data.target_max_len=8 (their answers lose their end, and the "
        "end-of-sequence token): raise it"
    )
    assert "1 of 3 sources were cut at data.source_max_len=32" in warnings[1]
    assert "'Below is an instruction that de'" in warnings[1]
    assert warnings[2] == f"train split: {report.tokens_dropped} tokens dropped by truncation in all"
    _, clean = tokenize(examples[2:], tok, source_max_len=32, target_max_len=8)
    assert clean.warnings("eval split", 32, 8) == [] and clean.tokens_dropped == 0


def test_batches_are_deterministic_grouped_and_resumable():
    tok = ByteTokenizer()
    data, _ = tokenize(make_examples(400, 0), tok, source_max_len=64, target_max_len=16)
    a = Batches(data, 8, tok.pad_id, seed=3)
    first = [next(a) for _ in range(60)]  # crosses an epoch boundary (50 batches per epoch)
    b = Batches(data, 8, tok.pad_id, seed=3)
    for x, y in zip(first, [next(b) for _ in range(60)], strict=True):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
    c = Batches(data, 8, tok.pad_id, seed=3)
    for _ in range(37):
        next(c)
    saved = c.state()
    d = Batches(data, 8, tok.pad_id, seed=3)
    d.restore(saved)
    for i in range(37, 60):
        np.testing.assert_array_equal(next(d)["input_ids"], first[i]["input_ids"])
    # length grouping pads less than a random order
    plain = Batches(data, 8, tok.pad_id, seed=3, group_by_length=False, pad_multiple=1)
    grouped = Batches(data, 8, tok.pad_id, seed=3, pad_multiple=1)
    pad = lambda it: np.mean([(~next(it)["attention_mask"]).sum() for _ in range(50)])  # noqa: E731
    assert pad(grouped) < 0.5 * pad(plain)
    fixed = next(Batches(data, 8, tok.pad_id, pad_to=96))
    assert fixed["input_ids"].shape == (8, 96)
    with pytest.raises(ValueError, match="shorter than the longest example"):
        Batches(data, 8, tok.pad_id, pad_to=8)


def test_sharegpt_and_alpaca_as_chat_become_conversations(tmp_path):
    share = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                               {"from": "gpt", "value": "Hello"}]}  # fmt: skip
    (ex,) = load_jsonl(_write(tmp_path, [share]), "sharegpt").examples
    assert ex.messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    )
    with pytest.raises(ValueError, match=r"d\.jsonl:1: turn 0: needs 'from' in"):
        load_jsonl(_write(tmp_path, [{"conversations": [{"from": "bot", "value": "x"}]}]), "sharegpt")
    with pytest.raises(ValueError, match=r"d\.jsonl:1: a conversation needs an assistant message"):
        load_jsonl(_write(tmp_path, [{"messages": [{"role": "user", "content": "x"}]}]), "chat")
    alpaca = [{"instruction": "Add", "input": "2 2", "output": "4"}, {"instruction": "Hi", "output": "Hello"}]
    a, b = load_jsonl(_write(tmp_path, alpaca), "alpaca", as_chat=True).examples
    assert a.messages == ({"role": "user", "content": "Add\n\n2 2"}, {"role": "assistant", "content": "4"})
    assert b.messages[0] == {"role": "user", "content": "Hi"} and b.target == "Hello"


def _chat_tok():
    from qlora_jax.data import load_tokenizer

    return load_tokenizer(ROOT_FIXTURES / "chat" / "smollm2")


def test_examples_get_the_post_processors_prefix_not_a_forced_bos():
    """SmolLM2's BOS is <|im_start|> and its tokenizer adds none: no BOS before an alpaca prompt.
    Llama-3's post-processor adds <|begin_of_text|>: one, not two."""
    from qlora_jax.data import load_tokenizer

    smol = _chat_tok()
    [t], _ = tokenize([Example("abc", "de")], smol, source_max_len=32, target_max_len=8)
    assert list(t.ids) == [*smol.encode("abc"), *smol.encode("de"), smol.eos_id]
    llama = load_tokenizer(ROOT_FIXTURES / "chat" / "llama3")
    [t], _ = tokenize([Example("abc", "de")], llama, source_max_len=32, target_max_len=8)
    assert list(t.ids[:1]) == [llama.bos_id] and int((t.ids == llama.bos_id).sum()) == 1


def test_conversations_train_on_assistant_turns_and_lose_whole_turns_first():
    from qlora_jax.data import tokenize_conversation

    tok = _chat_tok()
    turns = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."},
             {"role": "user", "content": "And of Germany?"}, {"role": "assistant", "content": "Berlin."}]  # fmt: skip
    conv = Conversation(tuple(turns))
    full, _ = tokenize_conversation(tok, turns)
    first, first_mask = tokenize_conversation(tok, turns[:2])
    [t], report = tokenize([conv], tok, source_max_len=len(full), target_max_len=0)
    assert list(t.ids) == list(full) and report.turns_dropped == 0 and report.tokens_dropped == 0
    [t], report = tokenize([conv], tok, source_max_len=len(full) - 1, target_max_len=0)
    assert list(t.ids) == list(first) and list(t.loss_mask) == list(first_mask)  # the whole last exchange went
    assert (report.turns_dropped, report.conversations_cut, report.tokens_dropped) == (1, 0, len(full) - len(first))
    [t], report = tokenize([conv], tok, source_max_len=len(first) - 2, target_max_len=0)
    assert len(t.ids) == len(first) - 2 and report.conversations_cut == 1
    assert "1 conversations were cut inside a turn" in report.warnings("train split", len(first) - 2, 0)[1]
    _, report = tokenize([conv], tok, source_max_len=30, target_max_len=0, skip_empty=True)
    assert report.skipped == 1  # the system prompt alone fills 30 tokens: nothing to train on


def test_packing_is_first_fit_deterministic_resumable_and_pads_less():
    from qlora_jax.data import PackedBatches

    rng = np.random.default_rng(0)
    data = [Tokenized(np.arange(n, dtype=np.int32), np.ones(n, bool)) for n in rng.integers(3, 20, 200)]
    packed = PackedBatches(data, 4, 0, seed=1, length=32)
    b = next(packed)
    assert b["input_ids"].shape == (4, 32) and set(b) >= {"segment_ids", "positions"}
    for r in range(4):  # positions restart per segment; padding is segment 0
        for k in range(1, b["segment_ids"][r].max() + 1):
            sel = b["segment_ids"][r] == k
            np.testing.assert_array_equal(b["positions"][r][sel], np.arange(sel.sum()))
            np.testing.assert_array_equal(b["input_ids"][r][sel], np.arange(sel.sum()))  # whole examples in order
        assert not b["attention_mask"][r][b["segment_ids"][r] == 0].any()
    # every example of the epoch lands in exactly one row
    rows = [i for batch in packed._order for row in batch for i in row]
    assert len(rows) == len(set(rows)) and len(rows) > 0.9 * len(data)
    one_per_row = 1 - sum(len(t.ids) for t in data) / (len(data) * 32)  # each example padded to 32 alone
    assert packed.padding_fraction() < 0.1 < 0.5 < one_per_row
    state = {"epoch": 0, "index": 3}
    packed.restore(state)
    a = [next(packed) for _ in range(60)]  # crosses epoch boundaries
    again = PackedBatches(data, 4, 0, seed=1, length=32)
    again.restore(state)
    for x, y in zip(a, [next(again) for _ in range(60)], strict=True):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
    with pytest.raises(ValueError, match="an example of 19 tokens does not fit rows of 16"):
        PackedBatches(data, 4, 0, length=16)
