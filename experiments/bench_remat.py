r"""What each gradient-checkpointing policy costs and saves: step memory and step time.

    python -m experiments.bench_remat                       # 4 blocks, hidden 1024, 1 x 2048 tokens
    python -m experiments.bench_remat --hidden=4096 --heads=32 --layers=4 --seq=512   # LLaMA-7B blocks

The gradient step of a QLoRA model (NF4+DQ, LoRA r=16 on all seven linears, bf16, layers scanned
as trained) is compiled without remat and with each planned ``remat_policy``
(:data:`qlora_jax.train.memory.PLANNED_POLICIES`): ``nothing_saveable`` keeps each block's input
and recomputes the block, ``save_linears`` also keeps every linear's output, ``offload_linears``
keeps those in host memory. Printed per variant: XLA's device and host temporary bytes
(``memory_analysis``), the planner's activation estimate (device + host), and the step's time —
on a GPU its device time (CUPTI, L2 flushed; ``experiments/timing.py``; a host copy is not a
kernel, so offloading's transfers show in the wall time beside it), on a CPU the median wall time
of whole steps — each as a ratio to ``nothing_saveable`` measured in the same run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import timing
from qlora_jax.nn import LlamaConfig, LlamaForCausalLM, LoRAConfig, QuantConfig
from qlora_jax.train import memory

_SEQ = flags.DEFINE_integer("seq", 2048, "Tokens per sequence (batch 1).")
_HIDDEN = flags.DEFINE_integer("hidden", 1024, "hidden_size (intermediate_size: 2.6875 x, as LLaMA-7B's).")
_HEADS = flags.DEFINE_integer("heads", 8, "num_attention_heads (and key/value heads).")
_LAYERS = flags.DEFINE_integer("layers", 4, "Decoder blocks.")
_VOCAB = flags.DEFINE_integer("vocab", 1024, "vocab_size (small: the head would hide the blocks).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps per variant.")

VARIANTS = (("no remat", False, "nothing_saveable"), *((p, True, p) for p in memory.PLANNED_POLICIES))
LORA = LoRAConfig(rank=16, dropout=0.0, dtype=jnp.bfloat16)


def _config() -> LlamaConfig:
    return timing.llama_blocks(_HIDDEN.value, _HEADS.value, _LAYERS.value, _VOCAB.value, _SEQ.value)


def _step(cfg: LlamaConfig, remat: bool, policy: str):
    model = LlamaForCausalLM(cfg, lora=LORA, quant=QuantConfig(), remat=remat, remat_policy=policy)
    v = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))

    def loss(params, base, ids):
        return model.apply({"params": params, "base": base}, ids).mean()

    grad = jax.jit(jax.grad(loss))
    stats = grad.lower(v["params"], v["base"], jax.ShapeDtypeStruct((1, _SEQ.value), jnp.int32)).compile()
    stats = stats.memory_analysis()
    return grad, model, stats.temp_size_in_bytes, stats.host_temp_size_in_bytes


def _seconds(grad, model) -> tuple[float | None, float]:
    """(device seconds or None off GPU, median wall seconds) of one step."""
    v = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))
    ids = jax.random.randint(jax.random.key(1), (1, _SEQ.value), 0, model.config.vocab_size)
    args = (v["params"], v["base"], ids)
    device = timing.device_seconds(grad, [args], _REPEATS.value)
    return (min(device) if device else None), timing.median_wall_seconds(grad, args, _REPEATS.value)


def main(argv):
    del argv
    cfg = _config()
    backend = "cpu" if jax.default_backend() == "cpu" else "gpu"
    print(f"backend {jax.default_backend()}; 1 x {_SEQ.value} tokens, {cfg.num_hidden_layers} blocks, hidden "
          f"{cfg.hidden_size}, intermediate {cfg.intermediate_size}, {cfg.num_attention_heads} heads; "
          "QLoRA r=16")  # fmt: skip
    print(f"{'variant':<18} {'device MiB':>10} {'host MiB':>9} {'planned MiB':>11} {'planned host':>12} "
          f"{'device ms':>9} {'wall ms':>8} {'time / nothing_saveable':>23}")  # fmt: skip
    rows = {}
    for name, remat, policy in VARIANTS:
        grad, model, temp, host = _step(cfg, remat, policy)
        acts = memory.activation_bytes(cfg, LORA, QuantConfig(), 1, _SEQ.value, remat, backend=backend,
                                       remat_policy=policy)  # fmt: skip
        planned_host = acts.pop("offloaded")
        device_s, wall_s = _seconds(grad, model)
        rows[name] = (temp, host, sum(acts.values()), planned_host, device_s, wall_s)
    base = rows["nothing_saveable"]
    for name, (temp, host, planned, planned_host, device_s, wall_s) in rows.items():
        t, t0 = (device_s, base[4]) if device_s else (wall_s, base[5])
        device = f"{device_s * 1e3:9.2f}" if device_s else f"{'n/a':>9}"
        print(f"{name:<18} {temp / 2**20:10.1f} {host / 2**20:9.1f} {planned / 2**20:11.1f} "
              f"{planned_host / 2**20:12.1f} {device} {wall_s * 1e3:8.1f} {t / t0:23.2f}")  # fmt: skip


if __name__ == "__main__":
    app.run(main)
