r"""Optimizer step time and memory: plain AdamW vs paged AdamW vs paged 8-bit AdamW, on a
LoRA-sized parameter tree, all measured in the same run.

    python -m experiments.bench_optim                   # CPU default: rank-16 LoRA on 2 layers of 7B shapes
    python -m experiments.bench_optim --layers=32 --rank=64   # QLoRA on LLaMA-7B: ~160 M adapter params

The tree has, per layer, lora_a [r, in] and lora_b [out, r] for the seven LLaMA-7B linears
(q, k, v, o: 4096x4096; gate, up: 11008x4096; down: 4096x11008). Reported: median step time
(update + apply, jitted, donated), the ratio to plain AdamW, optimizer-state bytes by memory kind,
and on a GPU the host<->device copy bandwidth (jax.device_put between memory kinds).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from qlora_jax.optim import adamw_8bit, paged, state_bytes_by_memory_kind

_LAYERS = flags.DEFINE_integer("layers", None, "Decoder layers (default: GPU 32, CPU 2).")
_RANK = flags.DEFINE_integer("rank", None, "LoRA rank (default: GPU 64, CPU 16).")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps (median reported).")
_CHUNK = flags.DEFINE_integer("chunk_mib", 0, "paged chunk size in MiB (0: one chunk).")

SHAPES = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096),
          "gate": (11008, 4096), "up": (11008, 4096), "down": (4096, 11008)}  # fmt: skip


def lora_tree(layers: int, rank: int):
    key = jax.random.key(0)
    tree = {}
    for i in range(layers):
        for name, (out, inp) in SHAPES.items():
            key, k1, k2 = jax.random.split(key, 3)
            tree[f"layers_{i}.{name}"] = {
                "lora_a": jax.random.normal(k1, (rank, inp), jnp.float32) * 0.01,
                "lora_b": jax.random.normal(k2, (out, rank), jnp.float32) * 0.01,
            }
    return tree


def _median_step(tx, params, repeats):
    state = tx.init(params)

    @jax.jit
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    step = jax.jit(step, donate_argnums=(0, 1))
    grads = jax.tree.map(lambda x: x * 1e-3, params)
    p = jax.tree.map(jnp.copy, params)
    p, state = step(p, state, grads)
    jax.block_until_ready(p)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        p, state = step(p, state, grads)
        jax.block_until_ready((p, state))
        times.append(time.perf_counter() - t)
    return float(np.median(times)), state_bytes_by_memory_kind(state)


def _copy_bandwidth():
    dev = jax.devices()[0]
    x = jnp.ones((256 * 2**20 // 4,), jnp.float32)  # 256 MiB
    host = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    device = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
    out = {}
    for name, target, src in (("device->host", host, x), ("host->device", device, jax.device_put(x, host))):
        jax.block_until_ready(jax.device_put(src, target))
        t = time.perf_counter()
        for _ in range(5):
            jax.block_until_ready(jax.device_put(src, target))
        out[name] = 5 * x.nbytes / (time.perf_counter() - t) / 1e9
    return out


def main(argv):
    del argv
    on_gpu = jax.default_backend() == "gpu"
    layers = _LAYERS.value or (32 if on_gpu else 2)
    rank = _RANK.value or (64 if on_gpu else 16)
    params = lora_tree(layers, rank)
    n = sum(x.size for x in jax.tree.leaves(params))
    chunk = _CHUNK.value * 2**20 or None
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}: {layers} layers, rank {rank}, "
          f"{n / 1e6:.1f} M adapter params; median of {_REPEATS.value} steps")  # fmt: skip
    rows = []
    for name, tx in (
        ("adamw", optax.adamw(2e-4)),
        ("paged adamw", paged(optax.adamw(2e-4), chunk_bytes=chunk)),
        ("paged adamw_8bit", paged(adamw_8bit(2e-4), chunk_bytes=chunk)),
    ):
        seconds, kinds = _median_step(tx, params, _REPEATS.value)
        rows.append((name, seconds, kinds))
    base = rows[0][1]
    print(f"{'optimizer':>18} {'step ms':>9} {'x adamw':>8} {'device MiB':>11} {'host MiB':>9}")
    for name, seconds, kinds in rows:
        print(f"{name:>18} {seconds * 1e3:>9.1f} {seconds / base:>8.2f} "
              f"{kinds.get('device', 0) / 2**20:>11.1f} {kinds.get('pinned_host', 0) / 2**20:>9.1f}")  # fmt: skip
    if on_gpu:
        for direction, gbps in _copy_bandwidth().items():
            print(f"{direction}: {gbps:.1f} GB/s (256 MiB device_put)")


if __name__ == "__main__":
    app.run(main)
