r"""Kernel benchmark: 4-bit dequantize and qmatmul against bf16 baselines measured in the same run.

    python -m experiments.bench_kernels                # GPU: everything; CPU: the XLA path at M=512
    python -m experiments.bench_kernels --json=out.json

Weights are ``[N, K]`` (bitsandbytes' ``[out, in]``), NF4 + double quantization, block 64; x is
``[M, K]`` bf16. Two measures of every op (:mod:`experiments.timing`):

* ``device``: per-call device time from CUPTI kernel events, L2 flushed by a 256 MiB scratch write
  before each call (its kernels left out by name), median of ``--repeats``; GPU only.
* ``slope``: ``--layers`` and twice as many distinct weights chained in one jit, the wall-time
  difference per layer: the op's cost with dispatch cancelled out; every backend (on the CPU it is
  the only one, and the table says so).

Ops, each against a baseline of the same shape measured in the same run:

* dequantize NF4+DQ -> bf16 against a device copy of the bf16 ``[N, K]`` (read + write): the
  ratio is the fraction of copy bandwidth reached; the Triton kernel, on Hopper and newer also the
  Mosaic GPU prototype (``mosaic_gpu``), and the XLA path;
  the first shape also times the kernel's old select-tree lookup (``pallas select``) beside the
  table lookup it replaced;
* qmatmul forward, and backward (dx from dy, the forward not recomputed) separately, for each
  implementation — ``pallas`` (tiled fused), ``pallas_decode`` (split-K decode kernel, M <= 16,
  forward only: its backward is the XLA path), ``pallas_dequant`` (dequantize kernel + XLA GEMM),
  ``xla`` (XLA dequantize + dot) — against the same bf16 ``x @ W.T`` / ``dy @ W`` (float32
  accumulation) on the dequantized weight;
* the backward's memory: qmatmul keeps only the 4-bit weight between forward and backward and
  dequantizes again in the backward (its cost is the backward rows' ratio to ``bf16 dot``, which
  is handed the bf16 weight); keeping a bf16 copy instead would hold 2 bytes per parameter per
  layer until the backward. The bytes of both residuals are printed per shape (on every backend:
  they come from ``jax.ad_checkpoint.saved_residuals``, not from a timer).

Ratios are printed, not asserted (the machines are noisy). ``--json`` is rewritten after every row,
so a run cut short by a timeout still leaves what it measured.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import timing
from qlora_jax import kernels, quant
from qlora_jax.kernels import mosaic_gpu

_MS = flags.DEFINE_list("m", None, "Rows of x (default: 1,16,512,4096 on GPU; 512 on CPU).")
_SHAPES = flags.DEFINE_list("kn", ["4096x4096", "4096x11008", "11008x4096"], "K x N pairs (in x out).")
_REPEATS = flags.DEFINE_integer("repeats", None, "Calls per measurement (default: GPU 10, CPU 3).")
_LAYERS = flags.DEFINE_integer("layers", None, "Distinct weights of the short chain (default: GPU 2, CPU 1).")
_JSON = flags.DEFINE_string("json", None, "Also write the rows to this JSON file.")


def _weights(k, n, count, seed=0):
    out = []
    for i in range(count):
        w = jax.random.normal(jax.random.key(seed + i), (n, k), jnp.bfloat16) * 0.02
        qt = quant.quantize(w, "nf4", 64, True)
        out.append((qt, quant.dequantize(qt, jnp.bfloat16)))
    return out


def _bf16_dot(x, w):
    """``x @ w.T`` as qmatmul computes it: bf16 operands, float32 accumulation, bf16 result. (A
    plain bf16 ``x @ w.T`` is not the same op: on the CPU it ran 5x slower, 83 vs 16.5 ms at
    512x4096x4096, and made every ratio look like a win.)"""
    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(x.dtype)


def _bf16_dot_backward(x, w, dy):
    """dx of :func:`_bf16_dot` as qmatmul's backward computes it: ``dy @ w`` on bf16 operands with
    float32 accumulation. (Autodiff of ``_bf16_dot`` would cast dy to float32 first: a float32 x
    bf16 product, a different and on the CPU much slower op.)"""
    del x
    return jax.lax.dot_general(dy, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32).astype(dy.dtype)


def _backward(f):
    """``dy -> dx`` of ``f``: the vjp alone (XLA drops the forward, which dx of a linear map does not need)."""
    return lambda x, w, dy: jax.vjp(lambda x: f(x, w), x)[1](dy)[0]


def _measure(op, args_list, repeats, layers):
    """``{"device_us", "slope_us"}`` of ``op(*args)``; ``args_list`` holds 2 * layers distinct args."""
    one = jax.jit(op)
    device = timing.device_seconds(one, args_list, repeats)

    def chain(n):
        return jax.jit(lambda items: [op(*a) for a in items]), (args_list[:n],)

    slope = timing.slope_seconds(chain, layers, repeats)
    return {"device_us": None if device is None else 1e6 * sorted(device)[len(device) // 2], "slope_us": 1e6 * slope}


def residual_bytes(f, x, qt) -> int:
    """Bytes the backward of ``x -> f(x, qt)`` holds from the forward: the arrays inside its vjp
    function (jax.vjp's residuals, the frozen weight included when that is all it keeps)."""
    _, vjp = jax.vjp(lambda x: f(x, qt), x)
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(vjp) if hasattr(a, "dtype"))


def _keep_bf16(x, qt):
    """The alternative to dequantizing again: plain autodiff of dequantize + dot, which keeps the
    dequantized bf16 weight as the product's residual."""
    return _bf16_dot(x, quant.dequantize(qt, jnp.bfloat16))


def _ratio(base: dict, ours: dict, key: str) -> float | None:
    """Baseline time over ours (> 1: ours is faster)."""
    if base[key] is None or ours[key] is None or ours[key] <= 0:
        return None
    return base[key] / ours[key]


def main(argv):
    del argv
    on_gpu = jax.default_backend() == "gpu"
    ms = [int(m) for m in (_MS.value or (["1", "16", "512", "4096"] if on_gpu else ["512"]))]
    repeats = _REPEATS.value or (10 if on_gpu else 3)
    layers = _LAYERS.value or (2 if on_gpu else 1)
    impls = ["pallas", "pallas_dequant", "xla"] if on_gpu else ["xla"]
    dev = jax.devices()[0]
    # the Mosaic GPU prototype needs Hopper or newer (TMA, warpgroups)
    hopper = on_gpu and float(getattr(dev, "compute_capability", "0") or 0) >= 9.0
    measures = (
        "device time (CUPTI, L2 flushed) and wall-time slope"
        if on_gpu
        else "wall-time slope only (no device timeline on CPU)"
    )
    print(f"jax {jax.__version__} on {dev.device_kind}: {measures}; {repeats} calls, slope over {layers} -> "
          f"{2 * layers} layers")  # fmt: skip
    rows, memory = [], []

    def dump():
        if _JSON.value:
            with open(_JSON.value, "w") as f:
                json.dump(dict(device=dev.device_kind, jax=jax.__version__, rows=rows, memory=memory), f, indent=1)

    def record(row):
        rows.append(row)
        dump()
        d = "-" if row["device_us"] is None else f"{row['device_us']:.1f}"
        print(f"measured {row['op']:<12} {row['impl']:<15} M={row['m']} K={row['k']} N={row['n']}: "
              f"device {d} us, slope {row['slope_us']:.1f} us", flush=True)  # fmt: skip

    for spec in _SHAPES.value:
        k, n = (int(s) for s in spec.split("x"))
        ws = _weights(k, n, 2 * layers)
        qts, w16 = [qt for qt, _ in ws], [w for _, w in ws]
        base = dict(k=k, n=n, m=None)
        record(dict(op="copy", impl="bf16", **base, **_measure(jnp.copy, [(w,) for w in w16], repeats, layers)))
        variants = [("pallas", "table"), ("pallas", "select"), ("xla", None)] if on_gpu else [("xla", None)]
        if hopper:
            variants.insert(2, ("mosaic_gpu", None))
        for impl, lookup in variants:
            if lookup == "select" and spec != _SHAPES.value[0]:
                continue
            if impl == "mosaic_gpu" and not mosaic_gpu.kernel_supports(qts[0]):
                continue
            sizes = kernels.DequantizeBlockSizes(lookup=lookup or "table")
            op = lambda qt, impl=impl, sizes=sizes: kernels.dequantize(qt, jnp.bfloat16, impl=impl, block_sizes=sizes)  # noqa: E731
            name = f"{impl} select" if lookup == "select" else impl
            record(dict(op="dequantize", impl=name, **base, **_measure(op, [(qt,) for qt in qts], repeats, layers)))
        x1 = jnp.zeros((1, k), jnp.bfloat16)
        ours = residual_bytes(lambda x, qt: kernels.qmatmul(x, qt, impl="xla"), x1, qts[0])
        kept = residual_bytes(_keep_bf16, x1, qts[0])
        memory.append(dict(k=k, n=n, requantize_bytes=ours, keep_bf16_bytes=kept))

        for m in ms:
            xs = [jax.random.normal(jax.random.key(100 + i), (m, k), jnp.bfloat16) for i in range(2 * layers)]
            dys = [jax.random.normal(jax.random.key(200 + i), (m, n), jnp.bfloat16) for i in range(2 * layers)]
            shape = dict(k=k, n=n, m=m)
            fwd_args = list(zip(xs, w16, strict=True))
            bwd_args = list(zip(xs, w16, dys, strict=True))
            record(dict(op="forward", impl="bf16 dot", **shape, **_measure(_bf16_dot, fwd_args, repeats, layers)))
            record(
                dict(op="backward", impl="bf16 dot", **shape, **_measure(_bf16_dot_backward, bwd_args, repeats, layers))
            )
            for impl in impls + (["pallas_decode"] if on_gpu and m <= kernels.DECODE_MAX_M else []):
                f = lambda x, qt, impl=impl: kernels.qmatmul(x, qt, impl=impl)  # noqa: E731
                q_fwd = list(zip(xs, qts, strict=True))
                q_bwd = list(zip(xs, qts, dys, strict=True))
                record(dict(op="forward", impl=impl, **shape, **_measure(f, q_fwd, repeats, layers)))
                if impl != "pallas_decode":  # its backward is the XLA path, timed as "xla"
                    record(dict(op="backward", impl=impl, **shape, **_measure(_backward(f), q_bwd, repeats, layers)))

    print()
    print(f"{'op':>10} {'M':>5} {'K':>6} {'N':>6} {'impl':>15} {'device us':>10} {'slope us':>9} "
          f"{'base/dev':>9} {'base/slope':>10}   (base: copy for dequantize, bf16 dot otherwise)")  # fmt: skip
    for r in rows:
        if r["impl"] in ("bf16", "bf16 dot"):
            continue
        base_impl = "bf16" if r["op"] == "dequantize" else "bf16 dot"
        base_op = "copy" if r["op"] == "dequantize" else r["op"]
        b = next(x for x in rows if (x["op"], x["impl"], x["m"] if base_op != "copy" else None, x["k"], x["n"])
                 == (base_op, base_impl, r["m"] if base_op != "copy" else None, r["k"], r["n"]))  # fmt: skip
        rd, rs = _ratio(b, r, "device_us"), _ratio(b, r, "slope_us")
        dev_s = "-" if r["device_us"] is None else f"{r['device_us']:.1f}"
        print(f"{r['op']:>10} {r['m'] or '':>5} {r['k']:>6} {r['n']:>6} {r['impl']:>15} {dev_s:>10} "
              f"{r['slope_us']:>9.1f} {'-' if rd is None else f'{rd:.2f}':>9} "
              f"{'-' if rs is None else f'{rs:.2f}':>10}")  # fmt: skip
    print("base/dev, base/slope: the baseline's time over ours (> 1: faster than the baseline; for dequantize, "
          "the fraction of copy bandwidth).")  # fmt: skip
    print()
    print("kept from forward to backward, per layer (qmatmul dequantizes again; the alternative keeps bf16):")
    for r in memory:
        ours, kept = r["requantize_bytes"], r["keep_bf16_bytes"]
        print(f"  K={r['k']} N={r['n']}: qmatmul {ours / 2**20:.2f} MiB, keep bf16 {kept / 2**20:.2f} MiB "
              f"({kept / ours:.2f}x)")  # fmt: skip
    dump()


if __name__ == "__main__":
    app.run(main)
