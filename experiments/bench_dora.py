r"""What DoRA costs over LoRA per training step, on a 4-bit and on a 16-bit base.

    python -m experiments.bench_dora                          # 4 blocks, hidden 1024, 1 x 1024 tokens
    python -m experiments.bench_dora --hidden=4096 --heads=32 --layers=4 --seq=512   # LLaMA-7B blocks

The gradient step (adapters r=16 on all seven linears, bf16 compute, remat, layers scanned as
trained) of LoRA and of DoRA (``LoRAConfig.use_dora``: each step takes the norm of every row of
``W + s B A``, so it needs the whole dequantized weight once more, and rescales the outputs) on an
NF4 + DQ base and on a bf16 base. Printed per variant: XLA's temporary bytes
(``memory_analysis``) and the step's time — on a GPU its device time (CUPTI, L2 flushed;
``experiments/timing.py``), on a CPU the median wall time of whole steps — with DoRA's ratio to
LoRA on the same base, measured in the same run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import timing
from qlora_jax.nn import LlamaConfig, LlamaForCausalLM, LoRAConfig, QuantConfig

_SEQ = flags.DEFINE_integer("seq", 1024, "Tokens per sequence (batch 1).")
_HIDDEN = flags.DEFINE_integer("hidden", 1024, "hidden_size (intermediate_size: 2.6875 x, as LLaMA-7B's).")
_HEADS = flags.DEFINE_integer("heads", 8, "num_attention_heads (and key/value heads).")
_LAYERS = flags.DEFINE_integer("layers", 4, "Decoder blocks.")
_VOCAB = flags.DEFINE_integer("vocab", 1024, "vocab_size (small: the head would hide the blocks).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps per variant.")

VARIANTS = (  # name, base storage, DoRA
    ("LoRA nf4", QuantConfig(), False),
    ("DoRA nf4", QuantConfig(), True),
    ("LoRA bf16", None, False),
    ("DoRA bf16", None, True),
)


def _config() -> LlamaConfig:
    return timing.llama_blocks(_HIDDEN.value, _HEADS.value, _LAYERS.value, _VOCAB.value, _SEQ.value)


def _measure(cfg: LlamaConfig, quant: QuantConfig | None, dora: bool):
    lora = LoRAConfig(rank=16, dropout=0.0, dtype=jnp.bfloat16, use_dora=dora)
    model = LlamaForCausalLM(cfg, lora=lora, quant=quant, remat=True)
    return timing.gradient_step_stats(model, _SEQ.value, _REPEATS.value)


def main(argv):
    del argv
    cfg = _config()
    print(f"backend {jax.default_backend()}; 1 x {_SEQ.value} tokens, {cfg.num_hidden_layers} blocks, hidden "
          f"{cfg.hidden_size}, intermediate {cfg.intermediate_size}; r=16 on all seven linears, remat")  # fmt: skip
    print(f"{'variant':<10} {'temp MiB':>9} {'device ms':>9} {'wall ms':>8} {'time / LoRA':>11} {'temp / LoRA':>11}")
    rows = {name: _measure(cfg, quant, dora) for name, quant, dora in VARIANTS}
    for name, (temp, device_s, wall_s) in rows.items():
        lora_temp, lora_dev, lora_wall = rows["LoRA " + name.split()[1]]
        t, t0 = (device_s, lora_dev) if device_s else (wall_s, lora_wall)
        device = f"{device_s * 1e3:9.2f}" if device_s else f"{'n/a':>9}"
        print(f"{name:<10} {temp / 2**20:9.1f} {device} {wall_s * 1e3:8.1f} {t / t0:11.2f} "
              f"{temp / max(lora_temp, 1):11.2f}")  # fmt: skip


if __name__ == "__main__":
    app.run(main)
