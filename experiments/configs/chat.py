r"""QLoRA on an instruct checkpoint with chat data, in the model's own chat template, packed.

    python -m experiments.finetune --config=experiments/configs/chat.py --workdir=runs/chat \
        --config.model_path=/path/to/SmolLM2-135M-Instruct --config.data.path=/path/to/chat.jsonl

The QLoRA recipe of ``llama_alpaca.py`` (NF4 + double quantization, LoRA r=64, alpha 16, dropout
0.1 on all seven linears, paged AdamW at 2e-4, batch 16 as 1 x 16 accumulation) on JSONL with
``messages`` (``{"role", "content"}`` lists; ``data.format="sharegpt"`` reads ShareGPT's
``conversations``). Every conversation is rendered by the checkpoint's chat template (its
``tokenizer_config.json`` / ``chat_template.jinja``; ``--config.data.chat_template`` overrides),
the loss is on every assistant turn and its end-of-turn token, and conversations are packed
several to a 1024-token row. 32 held-out conversations are answered greedily at each evaluation
(exact match of the last assistant turn, plain and normalized; ``samples.jsonl``).
Hardware: one GPU of >= 24 GB for 7B. Wall time and metrics: not yet measured by this project.
"""

from experiments.configs import llama_alpaca


def get_config():
    c = llama_alpaca.get_config()
    c.data.format = "chat"  # messages JSONL; sharegpt for ShareGPT's conversations
    c.data.train_on = "all_assistant"
    c.data.packing = True
    c.data.source_max_len = 768  # a row holds source_max_len + target_max_len = 1024 tokens
    c.data.target_max_len = 256  # also the longest generated answer
    c.data.num_eval = 200
    c.num_generate = 32
    c.eval_batches = 25
    return c
