"""Chat templates against transformers 5.24's ``apply_chat_template`` (fixtures/chat, written by
fixtures/make_chat_fixtures.py), and loss masks that decode to exactly the assistant's turns."""

import json
import pathlib

import numpy as np
import pytest

from qlora_jax.data import ByteTokenizer, apply_chat_template, load_tokenizer, tokenize_conversation
from qlora_jax.data.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplateError, render_conversation

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "chat"
DATA = json.loads((FIXTURES / "cases.json").read_text())
CONVERSATIONS = DATA["conversations"]
END_OF_TURN = {"smollm2": "<|im_end|>", "chatml": "<|im_end|>", "chatml_generation": "<|im_end|>",
               "llama3": "<|eot_id|>", "mistral": "</s>"}  # fmt: skip
TEMPLATE_CASES = [c for c in DATA["cases"] if "conversation" in c]


def _tok(name):
    return load_tokenizer(FIXTURES / name)


def _id(case):
    return f"{case['checkpoint']}-{case['conversation']}-gen{int(case['add_generation_prompt'])}" + (
        f"-{case['chat_template']}" if "chat_template" in case else ""
    )


@pytest.mark.parametrize("case", TEMPLATE_CASES, ids=[_id(c) for c in TEMPLATE_CASES])
def test_token_ids_equal_transformers(case):
    tok = _tok(case["checkpoint"])
    conv = CONVERSATIONS[case["conversation"]]
    kw = dict(add_generation_prompt=case["add_generation_prompt"], chat_template=case.get("chat_template"))
    if "error" in case:
        with pytest.raises(ChatTemplateError, match=f"the chat template refused the conversation: {case['error']}"):
            apply_chat_template(tok, conv, **kw)
        return
    if "text" in case:
        assert render_conversation(tok, conv, **kw) == case["text"]
    assert apply_chat_template(tok, conv, **kw) == case["ids"]


@pytest.mark.parametrize("case", [c for c in DATA["cases"] if "plain" in c], ids=lambda c: c["checkpoint"])
def test_plain_text_gets_what_the_post_processor_adds(case):
    """Llama-3 and Mistral tokenizers put their BOS before a text; SmolLM2's adds none."""
    tok = _tok(case["checkpoint"])
    assert tok.prefix_ids + tok.encode(case["plain"]) == case["ids"]
    assert (len(tok.prefix_ids) == 1) == (case["checkpoint"] in ("llama3", "mistral"))


def _rendered_content(checkpoint: str, content: str) -> str:
    return content.strip() if checkpoint == "llama3" else content  # the Llama-3 template trims


def _masked_runs(tok, ids, mask):
    runs, start = [], None
    for i, m in enumerate([*mask, False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append(tok.decode(ids[start:i], skip_special_tokens=False))
            start = None
    return runs


MASK_CASES = [
    (name, conv)
    for name in END_OF_TURN
    for conv in CONVERSATIONS
    if any(m["role"] == "assistant" for m in CONVERSATIONS[conv])
    and not (name == "mistral" and conv == "system_prompt")
]


@pytest.mark.parametrize("name, conv", MASK_CASES, ids=[f"{n}-{c}" for n, c in MASK_CASES])
def test_loss_mask_is_every_assistant_turn_and_its_end_of_turn_token(name, conv):
    tok = _tok(name)
    messages = CONVERSATIONS[conv]
    ids, mask = tokenize_conversation(tok, messages)
    assert list(ids) == apply_chat_template(tok, messages)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    want = [_rendered_content(name, a) + END_OF_TURN[name] for a in answers]
    assert _masked_runs(tok, ids, mask) == want
    ids, last = tokenize_conversation(tok, messages, train_on="last_assistant")
    assert _masked_runs(tok, ids, last) == want[-1:] and not (last & ~mask).any()
    _, every = tokenize_conversation(tok, messages, train_on="all")
    assert every.all()


def test_generation_blocks_give_transformers_assistant_mask():
    cases = [c for c in TEMPLATE_CASES if c["checkpoint"] == "chatml_generation" and not c["add_generation_prompt"]]
    assert len(cases) == len(CONVERSATIONS)
    tok = _tok("chatml_generation")
    for case in cases:
        _, mask = tokenize_conversation(tok, CONVERSATIONS[case["conversation"]])
        assert mask.astype(int).tolist() == case["assistant_mask"], case["conversation"]


def test_load_tokenizer_says_which_template_it_uses():
    assert _tok("smollm2").chat_template_source.endswith("smollm2/tokenizer_config.json")
    assert _tok("llama3").chat_template_source.endswith("llama3/chat_template.jinja")
    chatml = _tok("chatml")
    assert (
        sorted(chatml.chat_templates) == ["default", "tool_use"]
        and chatml.chat_template == chatml.chat_templates["default"]
    )
    assert "You are a helpful AI assistant named SmolLM" in _tok("smollm2").chat_template
    byte = ByteTokenizer()
    assert byte.chat_template is None and "default template" in byte.chat_template_source
    assert render_conversation(byte, CONVERSATIONS["single_turn"]) == (
        "<s>### Human: Hello there!\n### Assistant: Hi! How are you?</s>\n"
    )


def test_default_template_masks_the_answers_for_the_byte_tokenizer():
    tok = ByteTokenizer()
    messages = CONVERSATIONS["multi_turn"]
    ids, mask = tokenize_conversation(tok, messages)
    assert ids[0] == tok.bos_id and int((ids == tok.bos_id).sum()) == 1
    runs = [tok.decode(ids[s:e]) + "</s>" for s, e in _runs(mask)]
    assert runs == ["Paris.</s>", "Berlin, since 1990.</s>"]
    assert all(ids[e - 1] == tok.eos_id for _, e in _runs(mask))
    assert "eos_token" in DEFAULT_CHAT_TEMPLATE


def _runs(mask):
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2], strict=True))


def test_a_given_template_overrides_the_checkpoints(tmp_path):
    tok = _tok("smollm2")
    conv = CONVERSATIONS["single_turn"]
    chatml = _tok("chatml").chat_template
    assert render_conversation(tok, conv, chat_template=chatml).startswith("<|im_start|>user\n")
    (tmp_path / "t.jinja").write_text(chatml)
    assert render_conversation(tok, conv, chat_template=str(tmp_path / "t.jinja")) == render_conversation(
        tok, conv, chat_template=chatml
    )
    with pytest.raises(ValueError, match=r"neither a template name \(\['default'\]\), a .jinja file nor a template"):
        render_conversation(tok, conv, chat_template="no-such-template")


def test_bad_conversations_and_templates_say_what_is_wrong():
    tok = _tok("smollm2")
    with pytest.raises(ValueError, match=r"message 1 has role 'bot'; roles are"):
        apply_chat_template(tok, [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}])
    with pytest.raises(ValueError, match=r"message 0 \(user\) needs string content; got int"):
        apply_chat_template(tok, [{"role": "user", "content": 3}])
    with pytest.raises(ValueError, match="a conversation is a non-empty list of messages"):
        apply_chat_template(tok, [])
    with pytest.raises(ChatTemplateError, match="does not parse"):
        apply_chat_template(tok, CONVERSATIONS["single_turn"], chat_template="{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="refused the conversation"):  # the sandbox holds
        apply_chat_template(tok, CONVERSATIONS["single_turn"], chat_template="{{ ''.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError, match="may not set namespace attribute '_x'"):
        apply_chat_template(tok, CONVERSATIONS["single_turn"], chat_template="{% set ns = namespace(_x=1) %}")


def test_a_template_that_rewrites_earlier_turns_asks_for_generation_blocks():
    """A template that renders an answer differently once more messages follow (as templates that
    drop earlier reasoning do) cannot be masked by prefix renders: it says what to do."""
    rewriting = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ '<|im_start|>assistant\\n'"
        " + m['content'][:2] + '<|im_end|>\\n' }}{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] +"
        " '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    )
    with pytest.raises(ChatTemplateError, match=r"assistant message 1: .*\{% generation %\} blocks"):
        tokenize_conversation(_tok("chatml"), CONVERSATIONS["multi_turn"], chat_template=rewriting)
    # the other way out the message offers: train_on="all" needs no spans, so it renders
    tok = _tok("chatml")
    ids, mask = tokenize_conversation(tok, CONVERSATIONS["multi_turn"], chat_template=rewriting, train_on="all")
    assert mask.all() and list(ids) == apply_chat_template(tok, CONVERSATIONS["multi_turn"], chat_template=rewriting)
