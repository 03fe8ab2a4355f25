"""experiments/timing.py: the measurement rules the kernel benchmarks rely on."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from finetune_cli import ROOT

from experiments import timing


def test_kernel_seconds_leave_out_the_flush_by_name_and_convert_ms():
    per_call = [
        [("flush_fusion", 0.5), ("dequant", 0.010), ("gemm", 0.020)],
        [("dequant", 0.012), ("flush_fusion", 0.4)],
    ]
    np.testing.assert_allclose(timing.kernel_seconds(per_call, {"flush_fusion"}), [30e-6, 12e-6])
    with pytest.raises(
        ValueError, match=r"call 1 launched no kernel besides the flush's \(kernels: \['flush_fusion'\]\)"
    ):
        timing.kernel_seconds([[("a", 1.0)], [("flush_fusion", 0.4)]], {"flush_fusion"})


def test_slope_cancels_the_dispatch(monkeypatch):
    """A fake clock: every call costs 80 us of dispatch plus 7 us per chained layer; the slope is
    the layer's 7 us whatever the dispatch, while the per-call time of one layer would say 87."""
    clock = {"t": 0.0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["t"])

    def chain(n):
        def fn(x):
            clock["t"] += 80e-6 + n * 7e-6
            return x

        return fn, (jnp.zeros(()),)

    assert timing.slope_seconds(chain, 4, repeats=5) == pytest.approx(7e-6)
    assert timing.median_wall_seconds(*chain(1), 5) == pytest.approx(87e-6)
    with pytest.raises(ValueError, match="layers must be >= 1"):
        timing.slope(1.0, 2.0, 0)


def test_flush_rewrites_its_whole_scratch():
    flush = timing.l2_flush(4096)
    a = flush()
    b = flush()
    assert a.size * 4 == 4096 and np.all(np.asarray(b) == 2.0)  # every element read and written twice


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the CPU path")
def test_device_time_is_none_off_gpu_and_the_benchmark_says_so(tmp_path):
    assert timing.device_seconds(jax.jit(jnp.negative), [(jnp.ones(4),)], 2) is None
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "experiments.bench_kernels", "--kn=128x64", "--m=4", "--repeats=1", f"--json={out}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, timeout=300)
    assert "wall-time slope only (no device timeline on CPU)" in done.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {(r["op"], r["impl"]) for r in rows} == {
        ("copy", "bf16"), ("dequantize", "xla"), ("forward", "bf16 dot"), ("backward", "bf16 dot"),
        ("forward", "xla"), ("backward", "xla"),
    }  # fmt: skip
    assert all(r["device_us"] is None and np.isfinite(r["slope_us"]) for r in rows)
    # N=64 x K=128 NF4+DQ at block 64: codes N*K/2, 8-bit absmax N*K/64, one nested scale and the offset
    (memory,) = json.loads(out.read_text())["memory"]
    assert memory == dict(
        k=128, n=64, requantize_bytes=64 * 128 // 2 + 64 * 128 // 64 + 4 + 4, keep_bf16_bytes=2 * 64 * 128
    )
