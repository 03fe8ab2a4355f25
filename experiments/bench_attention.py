r"""Activation memory and step time of chunked attention against the whole-matrix reference.

    python -m experiments.bench_attention                      # S = 512 ... 8192, 1 block
    python -m experiments.bench_attention --seqs=512,2048 --heads=32 --head_dim=128 --hidden=4096

For each sequence length, the gradient step of a QLoRA model (NF4+DQ, LoRA r=16 on all seven
linears, bf16, layers scanned as trained) is compiled with ``attention="chunked"``, with
``"reference"`` and with ``"dot_product"`` (``jax.nn.dot_product_attention``: cuDNN flash
attention on a GPU where cuDNN takes the call, XLA's whole matrix on a CPU); printed: XLA's
temporary bytes (``memory_analysis``, nothing allocated), the planner's activation estimate for
the chunked one (:func:`qlora_jax.train.memory.activation_bytes`), their ratios, and on a GPU each
step's device time (CUPTI, L2 flushed; ``experiments/timing.py``) with the ratios to the
reference's. The reference's memory grows with S², the chunked one's with S.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import timing
from qlora_jax.nn import LlamaConfig, LlamaForCausalLM, LoRAConfig, QuantConfig
from qlora_jax.train import memory

_SEQS = flags.DEFINE_list("seqs", ["512", "1024", "2048", "4096", "8192"], "Sequence lengths.")
_HIDDEN = flags.DEFINE_integer("hidden", 1024, "hidden_size.")
_HEADS = flags.DEFINE_integer("heads", 8, "num_attention_heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "num_key_value_heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "head_dim.")
_LAYERS = flags.DEFINE_integer("layers", 1, "Decoder blocks.")
_VOCAB = flags.DEFINE_integer("vocab", 1024, "vocab_size (small: the head's logits would hide attention).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per variant (GPU only).")


def _config(seq: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=_VOCAB.value, hidden_size=_HIDDEN.value, intermediate_size=4 * _HIDDEN.value,
        num_hidden_layers=_LAYERS.value, num_attention_heads=_HEADS.value, num_key_value_heads=_KV_HEADS.value,
        head_dim=_HEAD_DIM.value, max_position_embeddings=seq,
    )  # fmt: skip


def _step(cfg: LlamaConfig, attention: str, seq: int):
    model = LlamaForCausalLM(cfg, lora=LoRAConfig(rank=16), quant=QuantConfig(), attention=attention)
    v = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))

    def loss(params, base, ids):
        return model.apply({"params": params, "base": base}, ids).mean()

    grad = jax.jit(jax.grad(loss))
    compiled = grad.lower(v["params"], v["base"], jax.ShapeDtypeStruct((1, seq), jnp.int32)).compile()
    return grad, model, compiled.memory_analysis().temp_size_in_bytes


def _device_seconds(grad, model, seq: int) -> float | None:
    if jax.default_backend() != "gpu":
        return None
    v = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))
    ids = jax.random.randint(jax.random.key(1), (1, seq), 0, model.config.vocab_size)
    per_call = timing.device_seconds(grad, [(v["params"], v["base"], ids)], _REPEATS.value)
    return min(per_call)


def main(argv):
    del argv
    print(f"backend {jax.default_backend()}; 1 x S tokens, hidden {_HIDDEN.value}, {_HEADS.value} heads x "
          f"{_HEAD_DIM.value}, {_LAYERS.value} block(s)")  # fmt: skip
    print(f"{'S':>6} {'reference MiB':>14} {'chunked MiB':>12} {'dot_product MiB':>15} {'chunked/ref':>11} "
          f"{'planner MiB':>12} {'planner/chunked':>15} {'ref ms':>8} {'chunked ms':>10} {'dot_product ms':>14} "
          f"{'chunked/ref':>11} {'dot_product/ref':>15}")  # fmt: skip
    for seq in (int(s) for s in _SEQS.value):
        cfg = _config(seq)
        steps = {name: _step(cfg, name, seq) for name in ("reference", "chunked", "dot_product")}
        mib = {name: temp / 2**20 for name, (_, _, temp) in steps.items()}
        backend = "cpu" if jax.default_backend() == "cpu" else "gpu"
        acts = memory.activation_bytes(cfg, LoRAConfig(rank=16), QuantConfig(), 1, seq, False, backend=backend)
        est = sum(acts.values()) / 2**20
        ms = {name: _device_seconds(grad, model, seq) for name, (grad, model, _) in steps.items()}
        if ms["reference"]:
            ref = ms["reference"]
            times = (f"{ref * 1e3:8.2f} {ms['chunked'] * 1e3:10.2f} {ms['dot_product'] * 1e3:14.2f} "
                     f"{ms['chunked'] / ref:11.2f} {ms['dot_product'] / ref:15.2f}")  # fmt: skip
        else:
            times = f"{'n/a':>8} {'n/a':>10} {'n/a':>14}"
        ratio = mib["chunked"] / mib["reference"]
        print(f"{seq:6d} {mib['reference']:14.1f} {mib['chunked']:12.1f} {mib['dot_product']:15.1f} "
              f"{ratio:11.3f} {est:12.1f} {est / mib['chunked']:15.2f} {times}")  # fmt: skip


if __name__ == "__main__":
    app.run(main)
