r"""Greedy decoding with the KV cache: tokens/s of an NF4+DQ base against the same model in bf16, one run.

    python -m experiments.bench_generate                    # CPU: a small shape, the XLA path
    python -m experiments.bench_generate --layers=4 --json=out.json   # GPU: LLaMA-3-8B-shaped layers

Model: LLaMA-3-8B layer shapes on a GPU (hidden 4096, intermediate 14336, 32 heads, 8 KV heads;
``--layers`` of them, default 4). The vocabulary defaults to ``128256 * layers / 32`` (16000 at 4
layers), not 128256: the lm_head stays bf16 in both variants and is read at every token, so a
full-size head over 4 of 32 layers would be 8x its share of the bytes of the real model and pull
the ratio towards 1. The full vocabulary fits (H200: 1 GiB per table), pass ``--vocab=128256``
for it. On the CPU the default is a small shape that finishes in seconds.

Variants, built from the same initial weights (one seed): the base NF4 + double quant, block 64
(``QuantConfig()``, what the repository trains with; ``qmatmul`` ``--impl``, default "auto", which
is the XLA path off GPU), and the base in bf16. Both carry the LoRA adapters of training, unmerged
(r=``--lora_rank``, default 16, all seven linears; 0: none), as decoding right after fine-tuning
runs them.

Timing: the decode step of :func:`qlora_jax.nn.generate` (the same ``decoder.apply`` on one
token, greedy argmax) in a ``fori_loop`` inside one compiled function, compiled ahead of time
(compile excluded) and started from a prefilled cache (prefill excluded; timed apart, one call).
The trip count is an argument, so one compilation runs a short and a long decode, and
``(T(long) - T(short)) / (long - short)`` is one token's step with dispatch and the per-call
cache copy cancelled out. The cache holds ``prompt_len + new_tokens`` positions in both, as
:func:`generate` allocates for ``max_new_tokens=new_tokens``: attention reads the whole allocated
cache every step, so its length is part of the per-token cost. Variants alternate within every
round (ABBA order); medians over ``--repeats`` rounds. The ratio NF4 / bf16 tokens/s is of figures
from the same run.
"""

from __future__ import annotations

import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from qlora_jax.kernels.qmatmul import IMPLS, choose_impl
from qlora_jax.nn import LlamaConfig, LlamaForCausalLM, LoRAConfig, QuantConfig, init_cache, sample_token
from qlora_jax.quant import QuantizedTensor

FULL_VOCAB, FULL_LAYERS = 128256, 32  # LLaMA-3-8B
GPU_SHAPE = {"hidden": 4096, "intermediate": 14336, "layers": 4, "heads": 32, "kv_heads": 8}
CPU_SHAPE = {"hidden": 256, "intermediate": 896, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 2048}
GPU_RUN = {"prompt_len": 128, "new_tokens": 128, "repeats": 10}
CPU_RUN = {"prompt_len": 16, "new_tokens": 32, "repeats": 5}
VARIANTS = {"nf4": "NF4+DQ base", "bf16": "bf16 base"}


def default_vocab(layers: int) -> int:
    """The lm_head's share of the per-token bytes of the 32-layer model, for ``layers`` layers."""
    return max(128, round(FULL_VOCAB * layers / FULL_LAYERS / 128) * 128)


def model_config(hidden, intermediate, layers, heads, kv_heads, vocab) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, rope_theta=500000.0,
        max_position_embeddings=8192, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip


def build(cfg: LlamaConfig, quant: QuantConfig | None, lora_rank: int, impl: str, seed: int = 0):
    """``(model, variables)``; the same seed gives both variants the same fp32 weights before storage."""
    lora = LoRAConfig(rank=lora_rank, dropout=0.0) if lora_rank else None
    model = LlamaForCausalLM(cfg, lora=lora, quant=quant, dtype=jnp.bfloat16, impl=impl)
    variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))
    return model, dict(variables)


def _prefill(model, cache_len, variables, input_ids):
    b, s = input_ids.shape
    cache = init_cache(model.config, b, cache_len, model.dtype, scan_layers=model.scan_layers)
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    logits, state = model.clone(decode=True).apply(
        {**variables, "cache": cache}, input_ids, jnp.ones((b, s), jnp.bool_), positions, mutable=["cache"]
    )
    return sample_token(logits[:, -1], None, 0.0, 1.0), state["cache"]


def _decode(model, new_tokens, variables, cache, token, position, steps):
    """``[B, new_tokens]``: the prefill's token, then ``steps`` greedy tokens (the rest stay 0).
    ``steps`` is traced: a while loop, one compilation for every trip count."""
    decoder = model.clone(decode=True)
    b = token.shape[0]
    out = jnp.zeros((b, new_tokens), jnp.int32).at[:, 0].set(token)

    def step(i, carry):
        out, cache, token, position = carry
        logits, state = decoder.apply(
            {**variables, "cache": cache},
            token[:, None],
            jnp.ones((b, 1), jnp.bool_),
            position[:, None],
            mutable=["cache"],
        )
        nxt = sample_token(logits[:, -1], None, 0.0, 1.0)
        return out.at[:, i].set(nxt), state["cache"], nxt, position + 1

    return jax.lax.fori_loop(1, 1 + steps, step, (out, cache, token, position))[0]


class Decoder:
    """One variant at one batch size: prefill and decode compiled ahead of time."""

    def __init__(self, model, variables, prompt, new_tokens):
        cache_len = prompt.shape[1] + new_tokens
        t = time.perf_counter()
        self.prefill = jax.jit(functools.partial(_prefill, model, cache_len)).lower(variables, prompt).compile()
        token, cache = self.prefill(variables, prompt)
        # the prompt has no padding: the first generated token sits at position prompt_len
        position = jnp.full(token.shape, prompt.shape[1], jnp.int32)
        decode = jax.jit(functools.partial(_decode, model, new_tokens))
        self.decode = decode.lower(variables, cache, token, position, np.int32(1)).compile()
        self.compile_s = time.perf_counter() - t
        self.model, self.variables, self.prompt, self.new_tokens = model, variables, prompt, new_tokens
        self.token, self.cache, self.position = jax.block_until_ready((token, cache, position))
        jax.block_until_ready(self.run(new_tokens - 1))  # first execution (allocations) outside the timing

    def run(self, steps: int) -> jax.Array:
        return self.decode(self.variables, self.cache, self.token, self.position, np.int32(steps))

    def time_decode(self, steps: int) -> float:
        t = time.perf_counter()
        jax.block_until_ready(self.run(steps))
        return time.perf_counter() - t

    def time_prefill(self) -> float:
        t = time.perf_counter()
        jax.block_until_ready(self.prefill(self.variables, self.prompt))
        return time.perf_counter() - t


def frozen_mib(variables: dict) -> float:
    return sum(x.nbytes for x in jax.tree.leaves(variables.get("base", {}))) / 2**20


def qmatmul_path(variables: dict, impl: str, m: int) -> str:
    """What the NF4 linears run at ``m`` rows of activations (``auto`` resolved for this device)."""
    if impl != "auto":
        return impl
    leaves = jax.tree.leaves(variables["base"], is_leaf=lambda x: isinstance(x, QuantizedTensor))
    # every linear has the same dispatch rule; a scanned weight's static shape is the per-layer [out, in]
    qt = next(x for x in leaves if isinstance(x, QuantizedTensor))
    return choose_impl(m, jnp.bfloat16, qt)


def measure(cfg: LlamaConfig, batches, prompt_len: int, new_tokens: int, repeats: int, lora_rank: int = 16,
            impl: str = "auto", seed: int = 0) -> dict:  # fmt: skip
    """Per-token decode time of both variants at each batch size, interleaved; a JSON-able dict."""
    if new_tokens < 3:
        raise ValueError(f"new_tokens must be >= 3 (a short and a longer decode); got {new_tokens}")
    if not batches or any(b < 1 for b in batches):
        raise ValueError(f"--batch must list positive batch sizes; got {list(batches)}")
    if prompt_len < 1 or repeats < 1:
        raise ValueError(f"--prompt_len and --repeats must be >= 1; got {prompt_len} and {repeats}")
    long_steps = new_tokens - 1  # the prefill gives the first token, as in generate()
    short_steps = max(1, long_steps // 4)
    built = {"nf4": build(cfg, QuantConfig(), lora_rank, impl, seed), "bf16": build(cfg, None, lora_rank, impl, seed)}
    rng = np.random.default_rng(seed)
    rows, ratios, kept = [], [], {}
    for b in batches:
        prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, prompt_len)), jnp.int32)
        decoders = {v: Decoder(*built[v], prompt, new_tokens) for v in VARIANTS}
        times = {v: {"short": [], "long": [], "prefill": []} for v in VARIANTS}
        for r in range(repeats):
            order = list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]
            for v in order + order[::-1]:  # ABBA: a drift over the round hits both variants alike
                times[v]["short"].append(decoders[v].time_decode(short_steps))
                times[v]["long"].append(decoders[v].time_decode(long_steps))
            for v in order:
                times[v]["prefill"].append(decoders[v].time_prefill())
        tps = {}
        for v, dec in decoders.items():
            t_short, t_long = float(np.median(times[v]["short"])), float(np.median(times[v]["long"]))
            per_token = (t_long - t_short) / (long_steps - short_steps)
            tps[v] = b / per_token
            out = np.asarray(dec.run(long_steps))
            kept[(v, b)] = (dec, out)
            rows.append({
                "variant": v, "batch": b, "ms_per_token": per_token * 1e3, "tokens_per_s": tps[v],
                "t_short_ms": t_short * 1e3, "t_long_ms": t_long * 1e3,
                "prefill_ms": float(np.median(times[v]["prefill"])) * 1e3, "compile_s": dec.compile_s,
                "frozen_mib": frozen_mib(built[v][1]), "tokens_shape": list(out.shape),
                "qmatmul": qmatmul_path(built[v][1], impl, b) if v == "nf4" else "bf16 dot",
            })  # fmt: skip
        ratios.append({"batch": b, "nf4_over_bf16_tokens_per_s": tps["nf4"] / tps["bf16"]})
    return {
        "jax": jax.__version__, "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
        "config": {"hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size, "layers": cfg.num_hidden_layers,
                   "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads, "vocab": cfg.vocab_size},
        "prompt_len": prompt_len, "new_tokens": new_tokens, "steps": [short_steps, long_steps], "repeats": repeats,
        "lora_rank": lora_rank, "impl": impl, "quant": "nf4, block 64, double quant (nested block 256)",
        "rows": rows, "ratios": ratios, "_decoders": kept,  # (Decoder, tokens) per (variant, batch): for tests
    }  # fmt: skip


def report(res: dict) -> str:
    c = res["config"]
    lines = [
        f"jax {res['jax']} on {res['device_kind']} ({res['backend']}): hidden {c['hidden']}, intermediate "
        f"{c['intermediate']}, {c['layers']} layers, {c['heads']}/{c['kv_heads']} heads, vocab {c['vocab']}; "
        f"prompt {res['prompt_len']}, {res['new_tokens']} new tokens, "
        + (f"LoRA r={res['lora_rank']} on all linears, unmerged" if res["lora_rank"] else "no LoRA adapters"),
        f"greedy decode, per token = (T({res['steps'][1]} steps) - T({res['steps'][0]} steps)) / "
        f"{res['steps'][1] - res['steps'][0]} in one jitted loop; medians of {res['repeats']} ABBA rounds",
    ]
    if res["backend"] != "gpu":
        lines.append(
            "CPU: ran the reference (XLA) path (no Pallas kernels off GPU); wall-time slope, no device timeline"
        )
    lines.append(
        f"{'':>12} {'batch':>5} {'qmatmul':>9} {'ms/token':>9} {'tokens/s':>10} {'prefill ms':>10} "
        f"{'compile s':>9} {'frozen MiB':>10}"
    )
    for r in res["rows"]:
        lines.append(
            f"{VARIANTS[r['variant']]:>12} {r['batch']:>5} {r['qmatmul']:>9} {r['ms_per_token']:>9.3f} "
            f"{r['tokens_per_s']:>10.1f} {r['prefill_ms']:>10.2f} {r['compile_s']:>9.1f} {r['frozen_mib']:>10.1f}"
        )
    if any(r["ms_per_token"] <= 0 for r in res["rows"]):
        lines.append("NOISY: a long decode took no longer than the short one; raise --new_tokens or --repeats")
    for q in res["ratios"]:
        lines.append(f"NF4+DQ / bf16 tokens/s at batch {q['batch']}: {q['nf4_over_bf16_tokens_per_s']:.2f}x")
    return "\n".join(lines)


def write_json(res: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump({k: v for k, v in res.items() if not k.startswith("_")}, f, indent=1)


def _define_flags() -> None:
    """Defined only when run as a script: the test workers import every module, and plan.py and
    bench_train.py already define --batch, --hidden, --layers (absl refuses a second definition)."""
    flags.DEFINE_integer("hidden", None, "hidden_size (default: GPU 4096, CPU 256).")
    flags.DEFINE_integer("intermediate", None, "intermediate_size (default: GPU 14336, CPU 896).")
    flags.DEFINE_integer("layers", None, "Decoder layers (default: GPU 4, CPU 2).")
    flags.DEFINE_integer("heads", None, "Attention heads (default: GPU 32, CPU 4).")
    flags.DEFINE_integer("kv_heads", None, "Key/value heads (default: GPU 8, CPU 2).")
    flags.DEFINE_integer("vocab", None, "vocab_size (default: GPU 128256 * layers / 32, CPU 2048).")
    flags.DEFINE_list("batch", ["1", "8"], "Batch sizes.")
    flags.DEFINE_integer("prompt_len", None, "Prompt tokens (default: GPU 128, CPU 16).")
    flags.DEFINE_integer("new_tokens", None, "Generated tokens, as generate(max_new_tokens=) (GPU 128, CPU 32).")
    flags.DEFINE_integer("repeats", None, "ABBA rounds (default: GPU 10, CPU 5).")
    flags.DEFINE_integer("lora_rank", 16, "LoRA rank of the unmerged adapters on all linears (0: none).")
    flags.DEFINE_enum("impl", "auto", list(IMPLS), "qmatmul implementation of the NF4 linears.")
    flags.DEFINE_string("json", None, "Also write the results to this JSON file.")


def main(argv):
    del argv
    f = flags.FLAGS
    gpu = jax.default_backend() == "gpu"
    shape, run = (GPU_SHAPE, GPU_RUN) if gpu else (CPU_SHAPE, CPU_RUN)
    dims = {k: getattr(f, k) or shape[k] for k in ("hidden", "intermediate", "layers", "heads", "kv_heads")}
    cfg = model_config(vocab=f.vocab or shape.get("vocab") or default_vocab(dims["layers"]), **dims)
    opts = {k: getattr(f, k) if getattr(f, k) is not None else v for k, v in run.items()}
    res = measure(cfg, [int(b) for b in f.batch], lora_rank=f.lora_rank, impl=f.impl, **opts)
    print(report(res))
    if f.json:
        write_json(res, f.json)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
