r"""QLoRA on a local LLaMA-family checkpoint with Alpaca-format JSONL: the paper's recipe.

    python -m experiments.finetune --config=experiments/configs/llama_alpaca.py --workdir=runs/alpaca \
        --config.model_path=/path/to/llama-7b-hf --config.data.path=/path/to/alpaca_data.jsonl

NF4 + double quantization, LoRA r=64, alpha=16, dropout 0.1 on all seven linears, paged AdamW,
lr 2e-4 constant after 3 % warmup, max grad norm 0.3, batch 16 as 1 x 16 accumulation, gradient
checkpointing, targets-only loss, group-by-length (QLoRA's qlora.py defaults, 7B/13B). The paged
moments are updated 256 MiB at a time. Several GPUs: set config.mesh and a batch_size divisible
by data x fsdp (README, Scale-out).
Hardware: one GPU of >= 24 GB for 7B. Wall time and metrics: not yet measured by this project
(no GPU run so far); the QLoRA paper reports its results for these settings.
"""

from experiments.configs import tiny


def get_config():
    c = tiny.get_config()
    c.model_path = ""  # required: a local HF checkpoint dir (config.json, safetensors, tokenizer.json)
    c.quant.type = "nf4"
    c.quant.double_quant = True
    c.lora.rank = 64
    c.lora.alpha = 16.0
    c.lora.dropout = 0.1
    c.lora.dtype = "bfloat16"  # qlora.py casts the LoRA layers to bf16 under --bf16; 33B fits 24 GB only so
    c.data.kind = "jsonl"
    c.data.format = "alpaca"
    c.data.num_eval = 200
    c.data.source_max_len = 384
    c.data.target_max_len = 128
    c.train.steps = 1875  # QLoRA's max_steps for Alpaca
    c.train.batch_size = 1
    c.train.accum_steps = 16
    c.train.learning_rate = 2e-4
    c.train.warmup_ratio = 0.03
    c.train.max_grad_norm = 0.3
    c.train.optimizer = "paged_adamw"
    # 256 MiB of moments on the device at a time: what lets 33B fit 24 GB (python -m experiments.plan)
    c.train.paged_chunk_bytes = 256 * 2**20
    c.train.remat = True
    c.log_every = 10
    c.eval_every = 200
    c.eval_batches = 50
    c.checkpoint_every = 250
    c.num_generate = 0
    return c
