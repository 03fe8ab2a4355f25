"""Timing kernels honestly: device time from profiler events with a cold L2, and a wall-time slope.

Per-call wall time around ``block_until_ready`` measures dispatch (50–95 µs on an H100) as much as
the kernel (see ``../shared/reference/measurement.md``), so the benchmarks use two measures:

* :func:`device_seconds` — GPU: each call's kernels as CUPTI records them
  (``jax.experimental.mosaic.gpu.profiler.measure``), with a scratch write larger than L2 between
  calls (:func:`l2_flush`) whose kernels are left out by name. ``None`` on other backends: the
  CPU has no device timeline to read, and the scripts say so.
* :func:`slope_seconds` — any backend: ``L`` and ``2L`` distinct layers chained in one jit
  (unrolled in Python, not ``lax.scan``: a scanned slice feeding a custom call may be copied);
  ``(T(2L) - T(L)) / L`` is one layer's cost with dispatch cancelled out.

Both give seconds per call; the benchmarks print them as ratios to a baseline measured in the
same run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

L2_FLUSH_BYTES = 256 * 2**20  # > the 50 MiB L2 of H100/H200 (and the 96 MiB of B200)


def l2_flush(nbytes: int = L2_FLUSH_BYTES) -> Callable[[], jax.Array]:
    """A jitted ``flush()`` that reads and writes ``nbytes`` of scratch: whatever the last call left
    in L2 is evicted before the next timed call."""
    scratch = jnp.zeros((nbytes // 4,), jnp.float32)
    step = jax.jit(lambda s: s + 1.0, donate_argnums=0)
    state = {"s": scratch}

    def flush():
        state["s"] = step(state["s"])
        return state["s"]

    return flush


def kernel_seconds(per_call: Sequence[Sequence[tuple[str, float]]], exclude: set[str]) -> list[float]:
    """Seconds of each call from CUPTI's ``[(kernel name, ms), ...]`` per call, without the kernels
    named in ``exclude`` (the flush's). A call that launched no other kernel is an error: it would
    time nothing."""
    out = []
    for i, kernels in enumerate(per_call):
        kept = [ms for name, ms in kernels if name not in exclude]
        if not kept:
            names = sorted({name for name, _ in kernels})
            raise ValueError(f"call {i} launched no kernel besides the flush's (kernels: {names})")
        out.append(sum(kept) / 1e3)
    return out


def device_seconds(fn: Callable, args_list: Sequence[tuple], repeats: int, flush_bytes: int = L2_FLUSH_BYTES):
    """Device seconds of ``fn(*args)`` for ``repeats`` calls, cycling ``args_list`` (distinct weights:
    none is served from L2 either way), L2 flushed before each call; ``None`` off GPU."""
    if jax.default_backend() != "gpu":
        return None
    from jax.experimental.mosaic.gpu import profiler  # GPU-only: CUPTI

    flush = l2_flush(flush_bytes)
    jax.block_until_ready(fn(*args_list[0]))  # compile outside the measurement
    jax.block_until_ready(flush())
    _, flush_kernels = profiler.measure(flush, aggregate=False)()
    exclude = {name for name, _ in flush_kernels or ()}
    per_call = []
    for r in range(repeats):
        args = args_list[r % len(args_list)]

        def once(args=args):
            flush()
            return fn(*args)

        _, kernels = profiler.measure(once, aggregate=False)()
        per_call.append(kernels or [])
    return kernel_seconds(per_call, exclude)


def slope(t_short: float, t_long: float, layers: int) -> float:
    """Per-layer seconds from the times of ``layers`` and ``2 * layers`` chained layers."""
    if layers < 1:
        raise ValueError(f"layers must be >= 1; got {layers}")
    return (t_long - t_short) / layers


def median_wall_seconds(fn: Callable, args: tuple, repeats: int) -> float:
    """Median wall seconds of ``fn(*args)`` (compiled and warmed up first)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def slope_seconds(chain: Callable[[int], tuple[Callable, tuple]], layers: int, repeats: int) -> float:
    """One layer's wall seconds without dispatch: ``chain(n)`` returns ``(jitted fn, args)`` running
    ``n`` distinct layers in one call; the slope between ``layers`` and ``2 * layers``."""
    short = median_wall_seconds(*chain(layers), repeats)
    long = median_wall_seconds(*chain(2 * layers), repeats)
    return slope(short, long, layers)


def gradient_step_stats(model, seq_len: int, repeats: int) -> tuple[int, float | None, float]:
    """``(temp bytes, device seconds or None off GPU, median wall seconds)`` of the adapters'
    gradient step of ``model`` (freshly initialized) on one random ``1 x seq_len`` sequence."""
    import jax.numpy as jnp

    v = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))
    ids = jax.random.randint(jax.random.key(1), (1, seq_len), 0, model.config.vocab_size)

    def loss(params, base, ids):
        return model.apply({"params": params, "base": base}, ids).astype(jnp.float32).mean()

    grad = jax.jit(jax.grad(loss))
    args = (v["params"], v["base"], ids)
    temp = grad.lower(*args).compile().memory_analysis().temp_size_in_bytes
    device = device_seconds(grad, [args], repeats)
    return temp, (min(device) if device else None), median_wall_seconds(grad, args, repeats)


def llama_blocks(hidden: int, heads: int, layers: int, vocab: int, seq: int):
    """A LLaMA of ``layers`` blocks shaped as LLaMA-7B's (intermediate 2.6875 × hidden, multiple
    of 64; as many key/value heads as heads) with a small vocabulary, for a benchmark's step."""
    from qlora_jax.nn import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.6875) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq,
    )  # fmt: skip
