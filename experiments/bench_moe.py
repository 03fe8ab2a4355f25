r"""Which MoE dispatch to use: sorted (one grouped matmul over the N·k token-expert pairs) against
dense (every expert on every token, weighted), by expert count.

    python -m experiments.bench_moe                                  # E = 4, 8, 32; top-2
    python -m experiments.bench_moe --experts=8 --hidden=4096 --moe=14336 --tokens=512   # Mixtral's layer

One Qwen3-MoE-style block (NF4+DQ experts, LoRA r=16 on every linear, experts' included, bf16):
the gradient step over the adapters, compiled for each dispatch. Printed per expert count:
XLA's temporary bytes (``memory_analysis``) and the step's time — on a GPU device time (CUPTI, L2
flushed; ``experiments/timing.py``), on a CPU the median wall time of whole steps — with dense's
time as a ratio to sorted's measured in the same run.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import timing
from qlora_jax.nn import LlamaConfig, LlamaForCausalLM, LoRAConfig, QuantConfig

_EXPERTS = flags.DEFINE_list("experts", ["4", "8", "32"], "Expert counts (num_experts).")
_TOP_K = flags.DEFINE_integer("top_k", 2, "num_experts_per_tok.")
_HIDDEN = flags.DEFINE_integer("hidden", 512, "hidden_size.")
_MOE = flags.DEFINE_integer("moe", 512, "moe_intermediate_size (each expert's).")
_TOKENS = flags.DEFINE_integer("tokens", 1024, "Tokens per step (batch 1).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps per variant.")

LORA = LoRAConfig(rank=16, dropout=0.0, dtype=jnp.bfloat16)


def _config(experts: int) -> LlamaConfig:
    h = _HIDDEN.value
    return LlamaConfig(
        model_type="qwen3_moe", vocab_size=256, hidden_size=h, intermediate_size=_MOE.value, num_hidden_layers=1,
        num_attention_heads=max(h // 128, 1), num_key_value_heads=max(h // 128, 1), qk_norm=True,
        num_experts=experts, num_experts_per_tok=_TOP_K.value, moe_intermediate_size=_MOE.value,
        max_position_embeddings=_TOKENS.value,
    )  # fmt: skip


def _measure(cfg: LlamaConfig, dispatch: str):
    lora = dataclasses.replace(LORA, targets=cfg.linear_names)
    model = LlamaForCausalLM(cfg, lora=lora, quant=QuantConfig(), moe_dispatch=dispatch)
    return timing.gradient_step_stats(model, _TOKENS.value, _REPEATS.value)


def main(argv):
    del argv
    print(f"backend {jax.default_backend()}; 1 x {_TOKENS.value} tokens, one block, hidden {_HIDDEN.value}, experts "
          f"of {_MOE.value}, top-{_TOP_K.value}; QLoRA r=16 on every linear")  # fmt: skip
    print(f"{'experts':>7} {'dispatch':<8} {'temp MiB':>9} {'device ms':>9} {'wall ms':>8} {'time / sorted':>13}")
    for e in map(int, _EXPERTS.value):
        rows = {d: _measure(_config(e), d) for d in ("sorted", "dense")}
        base = rows["sorted"]
        for d, (temp, device_s, wall_s) in rows.items():
            t, t0 = (device_s, base[1]) if device_s else (wall_s, base[2])
            device = f"{device_s * 1e3:9.2f}" if device_s else f"{'n/a':>9}"
            print(f"{e:7d} {d:<8} {temp / 2**20:9.1f} {device} {wall_s * 1e3:8.1f} {t / t0:13.2f}")


if __name__ == "__main__":
    app.run(main)
