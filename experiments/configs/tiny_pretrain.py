r"""Full-parameter pre-training of the tiny LLaMA: a base worth quantizing, for the ablations.

    python -m experiments.finetune --config=experiments/configs/tiny_pretrain.py --workdir=runs/pretrain

The tiny model of ``tiny.py`` (random init, byte-level tokenizer), unquantized, every weight trained
in float32 (no adapters) with AdamW on two synthetic task families, ``reverse`` and ``upper``. The
trained model is written to ``<workdir>/export/model`` as a Hugging Face checkpoint with its
tokenizer, so a QLoRA fine-tune on the other families starts from it:

    python -m experiments.finetune --config=experiments/configs/tiny.py --workdir=runs/ft \
        --config.model_path=runs/pretrain/export/model --config.data.families="('add', 'sort')"

Hardware: any CPU. Measured on the 2-core dev machine: 3.5 minutes; eval loss 0.092, exact match 0.82
on 256 generated answers of its two families (the base of the ablation notebooks, notebook 02).
"""

from experiments.configs import tiny


def get_config():
    c = tiny.get_config()
    c.quant.enabled = False
    c.lora.rank = 0
    c.train.trainable = "full"
    c.train.dtype = "float32"
    c.train.optimizer = "adamw"
    c.train.learning_rate = 3e-3
    c.train.lr_schedule = "cosine"  # at a constant 3e-3 the loss is still noisy at the end
    c.train.max_grad_norm = 1.0
    c.train.steps = 4000
    c.train.batch_size = 32
    c.data.families = ("reverse", "upper")
    c.data.num_train = 20_000  # 2,000 examples overfit: eval loss twice the train loss by step 1,500
    c.eval_every = 800
    c.checkpoint_every = 800
    return c
