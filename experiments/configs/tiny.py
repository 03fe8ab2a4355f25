r"""Tiny QLoRA fine-tune: the offline default (``make finetune``).

    python -m experiments.finetune --config=experiments/configs/tiny.py --workdir=runs/tiny

A small LLaMA (2 layers, hidden 128, byte-level vocabulary) initialised from a fixed seed, its
linears stored in NF4 + double quantization, LoRA r=16 on all seven linears, trained with paged
AdamW on the built-in synthetic instruction tasks (addition, sorting, reversing, uppercasing).
No downloads. Hardware: any CPU (2 cores here). Wall time and metrics: see README ("make
finetune"), measured there. Loss and perplexity fall; exact-match accuracy from a random base in
this budget stays near 0 — the run checks the pipeline, not the model.

The same config shrunk for tests and fast notebooks (compile time dominates there: a 1-layer model
of hidden 64, 64 training examples, one eval batch, no generation) is its ``small`` variant, the text
after the colon being ``get_config``'s argument (big_vision's convention):

    python -m experiments.finetune --config=experiments/configs/tiny.py:small --workdir=runs/small
"""

import ml_collections

# the small variant's changes, as dotted keys (``shrink`` applies them to a config derived from this
# one, e.g. configs/tiny_pretrain.py's, whose get_config takes no variant)
SMALL = {
    "model.hidden_size": 64,
    "model.intermediate_size": 128,
    "model.num_hidden_layers": 1,
    "data.num_train": 64,
    "data.num_eval": 16,
    "eval_batches": 1,
    "num_generate": 0,
    "train.batch_size": 8,
}
VARIANTS = ("small",)


def shrink(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` (changed in place, and returned) with the small variant's sizes: ``SMALL``."""
    config.update_from_flattened_dict(SMALL)
    return config


def get_config(arg: str | None = None):
    """The tiny fine-tune; ``arg="small"`` (``--config=experiments/configs/tiny.py:small``) shrinks it
    with ``SMALL``. Another ``arg`` is refused: a ValueError naming it and the variants."""
    if arg not in (None, "", *VARIANTS):
        raise ValueError(
            f"experiments/configs/tiny.py: unknown config variant {arg!r} (the text after the colon of "
            f"--config=experiments/configs/tiny.py:{arg}); the variants: {', '.join(map(repr, VARIANTS))}, "
            "or none for the full tiny config"
        )
    c = ml_collections.ConfigDict()
    c.seed = 0  # fixes the base init, adapters, data order and dropout
    c.model_path = ""  # a Hugging Face checkpoint directory; "" = the tiny random LLaMA below
    # a PEFT adapter directory to start training from (its r, alpha, targets, rsLoRA and DoRA replace
    # config.lora's; qlora_jax.checkpoints.load_peft_adapter); "" = fresh adapters
    c.init_adapter = ""
    c.check_finite = True  # refuse a checkpoint tensor holding NaN/Inf (False: load it anyway)
    c.progress = True  # tqdm bar

    c.model = ml_collections.ConfigDict()  # the architecture: used only without model_path
    c.model.hidden_size = 128
    c.model.intermediate_size = 256
    c.model.num_hidden_layers = 2
    c.model.num_attention_heads = 4
    c.model.num_key_value_heads = 2
    c.model.max_position_embeddings = 256
    # the decoder blocks under nn.scan (one compilation whatever the depth; also for model_path);
    # False unrolls them, which a per-layer quant.skip_modules / no_double_quant needs
    c.model.scan_layers = True

    c.quant = ml_collections.ConfigDict()
    c.quant.enabled = True  # False: 16-bit LoRA baseline (base kept in train.dtype)
    c.quant.type = "nf4"  # nf4 | fp4 | int4
    c.quant.block_size = 64
    c.quant.double_quant = True
    c.quant.nested_block_size = 256
    # linears kept in 16 bits / stored without double quant: module names or dotted parts of them,
    # e.g. ("layers.3.mlp.down_proj",) — the remedies the loader names for a badly quantizing tensor
    c.quant.skip_modules = ()
    c.quant.no_double_quant = ()

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.05
    c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    c.lora.use_rslora = False
    c.lora.use_dora = False  # DoRA: a trained magnitude per output row (PEFT's use_dora)
    # default (PEFT kaiming-uniform A) | gaussian | pissa | pissa_niter_<k> | olora | loftq: the last four
    # split each target weight of model_path into a base and adapters (qlora_jax.nn.lora_init)
    c.lora.init = "default"
    c.lora.loftq_iter = 1  # LoftQ's alternations of NF4 quantization and rank-r SVD
    c.lora.dtype = "float32"  # adapter parameters: float32 | bfloat16

    c.data = ml_collections.ConfigDict()
    c.data.kind = "synthetic"  # synthetic | jsonl
    c.data.path = ""  # JSONL file when kind == "jsonl"
    c.data.format = "alpaca"  # alpaca | chat (messages, or OASST text) | sharegpt | text
    c.data.families = ("add", "sort", "reverse", "upper")  # synthetic task families
    c.data.num_train = 2000
    c.data.num_eval = 64
    c.data.source_max_len = 32  # tokens
    c.data.target_max_len = 16
    c.data.train_on_source = False  # (source, target) examples: loss on targets only (QLoRA default)
    c.data.train_on = "all_assistant"  # conversations: all_assistant | last_assistant | all
    c.data.chat_template = ""  # "" = the checkpoint's own (or the default); a template name, a .jinja file or text
    c.data.packing = False  # several examples per row (segment ids): no padding compute; eval stays unpacked
    c.data.group_by_length = True
    c.data.skip_malformed = False  # True: skip (and count) malformed JSONL lines instead of failing

    c.train = ml_collections.ConfigDict()
    c.train.steps = 150  # 0: evaluate the model as built or loaded, without training
    c.train.batch_size = 16
    c.train.accum_steps = 1  # gradient accumulation: batch_size x accum_steps examples per step
    c.train.learning_rate = 2e-3
    c.train.warmup_ratio = 0.03
    c.train.lr_schedule = "constant"  # after warmup: constant (the QLoRA recipe) | cosine | linear (both decay to 0)
    c.train.max_grad_norm = 0.3
    c.train.weight_decay = 0.0
    c.train.adam_b2 = 0.999
    c.train.optimizer = "paged_adamw"  # paged_adamw | adamw | paged_adamw_8bit | adamw_8bit
    c.train.paged_min_size = 100_000  # paged optimizers: state leaves with >= this many elements go to host
    # paged optimizers: moments brought to the device per update chunk; 0 = all at once (bit-identical
    # to the unpaged optimizer; chunks agree to a few ulps)
    c.train.paged_chunk_bytes = 0
    c.train.trainable = "lora"  # lora: adapters only | full: every weight of an unquantized base (pre-training)
    c.train.dtype = "bfloat16"  # compute dtype
    c.train.remat = False  # gradient checkpointing per decoder block
    # what a checkpointed block keeps: nothing_saveable (its input only; recompute the block) |
    # save_linears (also every linear's output: no matmul recomputed) | offload_linears (those in host
    # memory, GPU) | dots_saveable | dots_with_no_batch_dims_saveable (qlora_jax.nn.llama.REMAT_POLICIES)
    c.train.remat_policy = "nothing_saveable"
    # attention in training and evaluation: chunked (keys attention_chunk at a time, memory O(S)) |
    # reference (the whole [S, S] score matrix) | dot_product (jax.nn.dot_product_attention: cuDNN
    # flash attention on a GPU, XLA's whole matrix on a CPU; no soft-capping); decoding always
    # attends to its cache directly
    c.train.attention = "chunked"
    c.train.attention_chunk = 512
    # mixture-of-experts models (Mixtral, Qwen-MoE): the router's load-balancing loss is added with
    # this weight (0: off, as transformers without output_router_logits; Mixtral's configs say 0.02,
    # Qwen's 0.001), and how tokens reach their experts: sorted (grouped matmul over the N·k
    # token-expert pairs) | dense (every expert on every token, weighted; qlora_jax.nn.moe)
    c.train.router_aux_loss_coef = 0.0
    c.train.moe_dispatch = "sorted"

    # Scale-out: a Mesh of data x fsdp over all devices (every host); -1 = the devices left over.
    # The batch is split over both axes; the frozen base is split over fsdp (block-aligned rows).
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    c.sharding = ml_collections.ConfigDict()
    c.sharding.params = "replicated"  # LoRA adapters: replicated | fsdp
    c.sharding.opt_state = "replicated"  # optimizer moments (paged ones stay in pinned_host): replicated | fsdp

    c.log_every = 10
    c.eval_every = 50
    c.eval_batches = 4
    c.checkpoint_every = 50
    c.num_generate = 16  # held-out eval examples answered greedily at each eval (exact match) and in samples.jsonl

    c.export = ml_collections.ConfigDict()
    c.export.merged = False  # export/merged: bf16 HF checkpoint with adapters merged
    c.export.quantized = False  # export/quantized: bitsandbytes 4-bit base
    c.export.gguf = ""  # export/model.gguf: the merged model for llama.cpp / Ollama: "" (off) | f16 | bf16 | q8_0
    c.export.again = False  # a finished run: write its exports again (e.g. after turning on export.merged)
    return shrink(c) if arg == "small" else c
