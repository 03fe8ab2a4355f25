r"""Quantize/dequantize throughput of the numerics core (pure jnp, jitted), against baselines
measured in the same run.

    python -m experiments.bench_quant                        # our figures + an XLA negate baseline
    python -m experiments.bench_quant --bnb_python=/tmp/bnbenv/bin/python   # + bitsandbytes

Baselines: ``negate`` is one jitted elementwise pass over the bf16 matrix (read n, write n
values): the memory-bound floor of this machine for any elementwise transform. With
``--bnb_python`` (an interpreter with torch + bitsandbytes, see tests/README.md), bitsandbytes'
``quantize_4bit``/``dequantize_4bit`` on CPU tensors of the same shapes are timed in a
subprocess right after ours, and the table prints our speed over theirs.
"""

import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from qlora_jax import quant

_SHAPES = flags.DEFINE_list("shapes", ["4096x4096", "11008x4096"], "Matrix shapes [out x in].")
_REPEATS = flags.DEFINE_integer("repeats", 9, "Timed repeats per measurement (median reported).")
_BNB_PYTHON = flags.DEFINE_string("bnb_python", None, "Python with torch+bitsandbytes for a bnb baseline.")

_BNB_SCRIPT = r"""
import json, sys, time, torch
import bitsandbytes.functional as F
shapes, repeats = json.loads(sys.argv[1]), int(sys.argv[2])
out = {}
for shape in shapes:
    x = torch.randn(*shape).to(torch.bfloat16)
    for dq in (False, True):
        def q():
            return F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=dq)
        packed, state = q(); q()
        tq = []
        for _ in range(repeats):
            t = time.perf_counter(); q(); tq.append(time.perf_counter() - t)
        F.dequantize_4bit(packed, state); F.dequantize_4bit(packed, state)
        td = []
        for _ in range(repeats):
            t = time.perf_counter(); F.dequantize_4bit(packed, state); td.append(time.perf_counter() - t)
        key = "x".join(map(str, shape)) + ("/dq" if dq else "/plain")
        out[key] = {"quantize": sorted(tq)[len(tq) // 2], "dequantize": sorted(td)[len(td) // 2]}
print(json.dumps(out))
"""


def _median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm-up
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _run_bnb(shapes, repeats):
    result = subprocess.run(
        [_BNB_PYTHON.value, "-c", _BNB_SCRIPT, json.dumps(shapes), str(repeats)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"bitsandbytes baseline failed ({_BNB_PYTHON.value}):\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv):
    del argv
    shapes = [tuple(int(s) for s in spec.split("x")) for spec in _SHAPES.value]
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; median of {_REPEATS.value} repeats")
    rows = []
    for shape in shapes:
        key = jax.random.key(0)
        x = jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16)
        n = x.size
        negate = jax.jit(jnp.negative)
        t_neg = _median_seconds(lambda x=x, negate=negate: negate(x), _REPEATS.value)
        for dq in (False, True):
            t_q = _median_seconds(lambda x=x, dq=dq: quant.quantize(x, "nf4", 64, dq), _REPEATS.value)
            qt = quant.quantize(x, "nf4", 64, dq)
            t_d = _median_seconds(lambda qt=qt: quant.dequantize(qt, jnp.bfloat16), _REPEATS.value)
            rows.append(dict(shape=shape, dq=dq, n=n, quantize=t_q, dequantize=t_d, negate=t_neg))
    bnb = _run_bnb([list(s) for s in shapes], _REPEATS.value) if _BNB_PYTHON.value else {}

    header = f"{'shape':>12} {'type':>7} {'op':>10} {'Melem/s':>9} {'x negate':>9} {'bnb Melem/s':>12} {'x bnb':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        for op in ("quantize", "dequantize"):
            rate = r["n"] / r[op] / 1e6
            vs_negate = r["negate"] / r[op]  # < 1: slower than one elementwise pass
            key = "x".join(map(str, r["shape"])) + ("/dq" if r["dq"] else "/plain")
            b = bnb.get(key, {}).get(op)
            bnb_cols = f"{r['n'] / b / 1e6:>12.0f} {b / r[op]:>7.2f}" if b else f"{'-':>12} {'-':>7}"
            print(
                f"{'x'.join(map(str, r['shape'])):>12} {'nf4+dq' if r['dq'] else 'nf4':>7} {op:>10} "
                f"{rate:>9.0f} {vs_negate:>9.2f} {bnb_cols}"
            )
    print("x negate: our time vs one jitted bf16 negate of the same matrix (same run).")
    if bnb:
        print("x bnb: bitsandbytes' time over ours (same run, bnb CPU path, bf16 input); > 1 = we are faster.")
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
