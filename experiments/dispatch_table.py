r"""Write this device kind's entry of ``qlora_jax/kernels/dispatch.json`` from a kernel benchmark.

    python -m experiments.dispatch_table --bench=$OUT/bench.json --tests_rc=0 --commit=$(git rev-parse --short HEAD) \
        --out=$OUT/dispatch.json        # tools/gpu_check.sh does this; copy the file back to commit it

Only from a run whose compiled kernel tests passed and whose benchmark finished (``--tests_rc=0``:
gpu_check.sh passes the first nonzero of the two) and only from device times
(``bench_kernels`` on a GPU). Per M the fastest implementation by device time, summed over the
benchmark's shapes: the forward alone for M <= 16 (decoding), forward + backward above (training);
neighbouring Ms with the same winner share a bucket, the last one unbounded (``pallas_decode``, for
M <= 16 only, is followed by the best of the others at the largest M measured). Dequantize: the fastest
of the Triton kernel, the Mosaic GPU kernel and the XLA path, among those measured on every shape.
"""

from __future__ import annotations

import datetime
import json
import pathlib
from collections import defaultdict

from absl import app, flags

from qlora_jax.kernels import DECODE_MAX_M, dispatch

# not required=True: that would be checked by every absl parse in a process that imports this module
# (the test suite's workers import them all)
_BENCH = flags.DEFINE_string("bench", None, "bench_kernels --json output (a GPU run); required.")
_TESTS_RC = flags.DEFINE_integer("tests_rc", None, "Exit status of the kernel tests (or the benchmark's); required.")
_COMMIT = flags.DEFINE_string("commit", "", "Commit the run measured.")
_OUT = flags.DEFINE_string("out", str(dispatch.TABLE_FILE), "The table to update (read, then written).")


def entry_from_rows(rows: list[dict], *, commit: str, date: str) -> dict:
    """The dispatch entry the benchmark rows support (see the module docstring)."""
    timed = [r for r in rows if r.get("device_us") is not None]
    if not timed:
        raise ValueError("the benchmark has no device times (a CPU run?): nothing to choose from")
    deq, deq_shapes = defaultdict(float), defaultdict(set)
    for r in timed:
        if r["op"] == "dequantize" and r["impl"] in dispatch.DEQUANTIZE_IMPLS:  # not "pallas select", say
            deq[r["impl"]] += r["device_us"]
            deq_shapes[r["impl"]].add((r["k"], r["n"]))
    every_shape = set().union(*deq_shapes.values()) if deq_shapes else set()
    deq = {impl: t for impl, t in deq.items() if deq_shapes[impl] == every_shape}  # sums over the same shapes
    per_m: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in timed:
        if r["op"] in ("forward", "backward") and r["impl"] in dispatch.QMATMUL_IMPLS:
            if r["op"] == "forward" or r["m"] > DECODE_MAX_M:
                per_m[r["m"]][r["impl"]] += r["device_us"]
    best = [(m, min(impls, key=impls.get)) for m, impls in sorted(per_m.items())]
    rules: list[list] = []
    for m, impl in best:
        if rules and rules[-1][1] == impl:
            rules[-1][0] = m
        else:
            rules.append([m, impl])
    if rules and rules[-1][1] == "pallas_decode":  # it takes M <= 16 only: beyond, the best of the others
        m, impls = max(per_m.items())
        others = {i: t for i, t in impls.items() if i != "pallas_decode"}
        rules.append([None, min(others, key=others.get) if others else "xla"])
    if rules:
        rules[-1][0] = None  # beyond the largest M measured: what won there
    entry = {
        "dequantize": min(deq, key=deq.get) if deq else "xla",
        "qmatmul": rules,
        "measured": {"date": date, "commit": commit, "source": "experiments/bench_kernels.py device time (CUPTI)"},
    }
    dispatch.check_entry("(new)", entry, where="experiments.dispatch_table")
    return entry


def main(argv):
    del argv
    if _BENCH.value is None or _TESTS_RC.value is None:
        raise app.UsageError("--bench and --tests_rc are required")
    if _TESTS_RC.value != 0:
        rc = _TESTS_RC.value
        raise SystemExit(f"dispatch_table: the kernel tests or the benchmark failed (rc={rc}); table left as is")
    bench = json.loads(pathlib.Path(_BENCH.value).read_text())
    date = datetime.date.today().isoformat()
    entry = entry_from_rows(bench["rows"], commit=_COMMIT.value, date=date)
    out = pathlib.Path(_OUT.value)
    table = json.loads((out if out.exists() else dispatch.TABLE_FILE).read_text())
    table.setdefault("devices", {})[bench["device"]] = entry
    out.write_text(json.dumps(table, indent=2) + "\n")
    print(f"{out}: {bench['device']}: {json.dumps(entry)}")


if __name__ == "__main__":
    app.run(main)
