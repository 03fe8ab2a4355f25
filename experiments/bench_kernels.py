r"""Kernel benchmark: 4-bit dequantize and qmatmul against bf16 baselines measured in the same run.

    python -m experiments.bench_kernels                # GPU: everything; CPU: the XLA path at M=512
    python -m experiments.bench_kernels --json=out.json

Weights are ``[N, K]`` (bitsandbytes' ``[out, in]``), NF4 + double quantization, block 64; x is
``[M, K]`` bf16. For every (M, K, N):

* dequantize: time and achieved GB/s (bytes read + written) of the dequantize kernel, against a
  bf16 negate of an ``[N, K]`` array (read + write, i.e. a device-to-device copy's traffic).
* qmatmul forward and forward+backward (vjp w.r.t. x) for each implementation — ``pallas``
  (fused), ``pallas_dequant`` (dequantize kernel + XLA GEMM), ``xla`` (XLA dequantize + dot) —
  against ``bf16 dot``: XLA's ``x @ W.T`` on the already-dequantized bf16 weight.

Median of ``--repeats`` timed calls after warm-up; each call takes the next of ``--rotate``
distinct weights and inputs, so the 4-bit weight is not served from L2 (50 MiB on H100). Ratios
are printed, not asserted (the machines are noisy). ``best`` names the fastest implementation per
shape: the measurement ``kernels.qmatmul.FUSED_MAX_M`` is set from.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from qlora_jax import kernels, quant

_MS = flags.DEFINE_list("m", None, "Rows of x (default: 1,16,512,4096 on GPU; 512 on CPU).")
_SHAPES = flags.DEFINE_list("kn", ["4096x4096", "4096x11008", "11008x4096"], "K x N pairs (in x out).")
_REPEATS = flags.DEFINE_integer("repeats", None, "Timed calls per measurement (default: GPU 30, CPU 3).")
_ROTATE = flags.DEFINE_integer("rotate", None, "Distinct weights/inputs cycled (default: GPU 4, CPU 1).")
_JSON = flags.DEFINE_string("json", None, "Also write the rows to this JSON file.")


def _median_seconds(fn, args_list, repeats):
    for args in args_list[:2]:
        jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for r in range(repeats):
        args = args_list[r % len(args_list)]
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _fwd_bwd(f, x, dy):
    """Forward output and dx, both returned so that neither pass is dead code."""
    y, vjp = jax.vjp(f, x)
    return y, vjp(dy)[0]


def _weights(k, n, count, seed=0):
    out = []
    for i in range(count):
        w = jax.random.normal(jax.random.key(seed + i), (n, k), jnp.bfloat16) * 0.02
        qt = quant.quantize(w, "nf4", 64, True)
        out.append((qt, quant.dequantize(qt, jnp.bfloat16)))
    return out


def main(argv):
    del argv
    on_gpu = jax.default_backend() == "gpu"
    ms = [int(m) for m in (_MS.value or (["1", "16", "512", "4096"] if on_gpu else ["512"]))]
    repeats = _REPEATS.value or (30 if on_gpu else 3)
    rotate = _ROTATE.value or (4 if on_gpu else 1)
    impls = ["pallas", "pallas_dequant", "xla"] if on_gpu else ["xla"]
    dev = jax.devices()[0]
    print(f"jax {jax.__version__} on {dev.device_kind}; median of {repeats}, {rotate} rotated inputs")
    rows = []

    for spec in _SHAPES.value:
        k, n = (int(s) for s in spec.split("x"))
        ws = _weights(k, n, rotate)
        qts = [qt for qt, _ in ws]
        w16 = [w for _, w in ws]

        negate = jax.jit(jnp.negative)
        t_copy = _median_seconds(negate, [(w,) for w in w16], repeats)
        copy_bytes = 2 * 2 * n * k
        if on_gpu:
            deq = jax.jit(lambda qt: kernels.dequantize(qt, jnp.bfloat16, impl="pallas"))
            t_deq = _median_seconds(deq, [(qt,) for qt in qts], repeats)
            deq_bytes = qts[0].nbytes + 2 * n * k
            print(f"measured dequantize K={k} N={n}: {t_deq * 1e6:.1f} us; copy {t_copy * 1e6:.1f} us", flush=True)
            rows.append(
                dict(op="dequantize", m=None, k=k, n=n, impl="pallas", seconds=t_deq,
                     gbps=deq_bytes / t_deq / 1e9, copy_gbps=copy_bytes / t_copy / 1e9)
            )  # fmt: skip

        for m in ms:
            xs = [jax.random.normal(jax.random.key(100 + i), (m, k), jnp.bfloat16) for i in range(rotate)]
            dys = [jax.random.normal(jax.random.key(200 + i), (m, n), jnp.bfloat16) for i in range(rotate)]
            dot = jax.jit(lambda x, w: x @ w.T)
            dot_vjp = jax.jit(lambda x, w, dy: _fwd_bwd(lambda x: x @ w.T, x, dy))
            t_dot = _median_seconds(dot, list(zip(xs, w16, strict=True)), repeats)
            t_dot_fb = _median_seconds(dot_vjp, list(zip(xs, w16, dys, strict=True)), repeats)
            base = dict(m=m, k=k, n=n, dot_seconds=t_dot, dot_fb_seconds=t_dot_fb)
            for impl in impls:
                f = jax.jit(lambda x, qt, impl=impl: kernels.qmatmul(x, qt, impl=impl))
                f_vjp = jax.jit(
                    lambda x, qt, dy, impl=impl: _fwd_bwd(lambda x: kernels.qmatmul(x, qt, impl=impl), x, dy)
                )
                t_f = _median_seconds(f, list(zip(xs, qts, strict=True)), repeats)
                t_fb = _median_seconds(f_vjp, list(zip(xs, qts, dys, strict=True)), repeats)
                rows.append(dict(op="qmatmul", impl=impl, seconds=t_f, fb_seconds=t_fb, **base))
                # streamed as measured, so a run cut short by a time limit still reports
                print(
                    f"measured M={m} K={k} N={n} {impl}: fwd {t_f * 1e6:.1f} us, fwd+bwd {t_fb * 1e6:.1f} us;"
                    f" bf16 dot {t_dot * 1e6:.1f} / {t_dot_fb * 1e6:.1f} us",
                    flush=True,
                )

    print()
    if on_gpu:
        print(f"{'K':>6} {'N':>6} {'dequant us':>10} {'GB/s':>7} {'copy GB/s':>9} {'% copy':>7}")
        for r in (r for r in rows if r["op"] == "dequantize"):
            print(
                f"{r['k']:>6} {r['n']:>6} {r['seconds'] * 1e6:>10.1f} {r['gbps']:>7.0f} "
                f"{r['copy_gbps']:>9.0f} {100 * r['gbps'] / r['copy_gbps']:>6.0f}%"
            )
        print()
    head = f"{'M':>5} {'K':>6} {'N':>6} {'impl':>15} {'fwd us':>9} {'dot/fwd':>8}"
    print(head + f" {'fwd+bwd us':>10} {'dot/fb':>7} {'xla/fwd':>8}")
    for r in (r for r in rows if r["op"] == "qmatmul"):
        xla = next(
            x
            for x in rows
            if x["op"] == "qmatmul" and x["impl"] == "xla" and (x["m"], x["k"], x["n"]) == (r["m"], r["k"], r["n"])
        )
        print(
            f"{r['m']:>5} {r['k']:>6} {r['n']:>6} {r['impl']:>15} {r['seconds'] * 1e6:>9.1f} "
            f"{r['dot_seconds'] / r['seconds']:>8.2f} {r['fb_seconds'] * 1e6:>10.1f} "
            f"{r['dot_fb_seconds'] / r['fb_seconds']:>7.2f} {xla['seconds'] / r['seconds']:>8.2f}"
        )
    print("dot/fwd, dot/fb: bf16 dot time over ours (> 1: faster than bf16). xla/fwd: XLA dequantize+dot over ours.")
    if on_gpu:
        print()
        for key in sorted({(r["m"], r["k"], r["n"]) for r in rows if r["op"] == "qmatmul"}):
            cands = [r for r in rows if r["op"] == "qmatmul" and (r["m"], r["k"], r["n"]) == key]
            best_f = min(cands, key=lambda r: r["seconds"])["impl"]
            best_fb = min(cands, key=lambda r: r["fb_seconds"])["impl"]
            print(f"best  M={key[0]:<5} K={key[1]:<6} N={key[2]:<6} fwd: {best_f:<15} fwd+bwd: {best_fb}")
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(dict(device=dev.device_kind, jax=jax.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    app.run(main)
