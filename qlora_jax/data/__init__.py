"""Data: JSONL instruction formats, tokenizers, a synthetic task set, batching."""

from qlora_jax.data.batching import Batches, PackedBatches, Tokenized, TokenizeReport, collate, collate_packed, tokenize
from qlora_jax.data.chat import apply_chat_template, tokenize_conversation
from qlora_jax.data.evaluation import GenerationItem, exact_match, generation_items, normalize_answer, stop_ids
from qlora_jax.data.jsonl import Conversation, Example, JsonlDataset, load_jsonl
from qlora_jax.data.synthetic import as_conversations, make_examples
from qlora_jax.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "Batches",
    "ByteTokenizer",
    "Conversation",
    "Example",
    "GenerationItem",
    "HFTokenizer",
    "JsonlDataset",
    "PackedBatches",
    "TokenizeReport",
    "Tokenized",
    "apply_chat_template",
    "as_conversations",
    "collate",
    "collate_packed",
    "exact_match",
    "generation_items",
    "load_jsonl",
    "load_tokenizer",
    "make_examples",
    "normalize_answer",
    "stop_ids",
    "tokenize",
    "tokenize_conversation",
]
