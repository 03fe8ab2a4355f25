#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (jax 0.11.2 + CUDA preinstalled, no network):
#   1. the kernel and optimizer tests compiled for the GPU (QLORA_JAX_INTERPRET=0), not interpreted,
#      and the memory planner against the compiled step on the GPU;
#   2. experiments/bench_kernels.py: device time per kernel (CUPTI events, L2 flushed) and the
#      dispatch-free wall-time slope, forward and backward apart, each as a ratio to copy / bf16 dot
#      (streamed as measured: a timeout still leaves the rows done so far in bench.log and bench.json);
#      then experiments/dispatch_table.py: this card's entry of qlora_jax/kernels/dispatch.json
#      (only from a complete benchmark: a partial one would sum the Ms over different shapes);
#   3. experiments/bench_generate.py (decode tokens/s, NF4+DQ vs bf16, LLaMA-3-8B-shaped layers, batch 1 and 8);
#   4. experiments/bench_train.py --shape=7b (QLoRA step vs bf16-LoRA step at LLaMA-7B layer shapes);
#   5. experiments/bench_optim.py (paged / 8-bit AdamW step time, host<->device GB/s);
#   6. experiments/bench_attention.py (chunked vs whole-matrix vs jax.nn.dot_product_attention / cuDNN:
#      step memory and device time);
#   7. experiments/bench_remat.py (remat policies at LLaMA-7B block shapes: step memory, host bytes, time);
#   8. experiments/bench_moe.py (MoE dispatch, sorted/grouped vs dense, at 8 and 32 experts: memory, time);
#   9. experiments/bench_dora.py (DoRA's step over LoRA's on NF4 and bf16 bases: memory, time).
# Prints a short summary table last; full logs go to $OUT (or /tmp/gpu_check). Budget: at most 10.8 min
# (timeouts 130 + 180 + 60 + 60 + 40 + 75 + 45 + 30 + 30 s) plus the machine's start.
# Usage (device tool): bash tools/gpu_check.sh
# Dry run on a CPU (interpret mode, XLA path only): QLORA_JAX_INTERPRET=1 PY=.venv/bin/python bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" QLORA_JAX_INTERPRET=${QLORA_JAX_INTERPRET:-0} PYTHONUNBUFFERED=1
PY=${PY:-python3}

{
  date -u +"%Y-%m-%dT%H:%MZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
  $PY -c 'import jax; print("jax", jax.__version__, jax.devices())' 2>&1
} | tee "$OUT/env.txt"

# -p no:cacheprovider: the tree may be read-only; -o addopts=: no xdist there (one GPU anyway).
timeout 130 $PY -m pytest tests/kernels tests/optim tests/train/test_memory.py tests/test_timing.py -q -p no:cacheprovider -o addopts="--strict-markers --import-mode=importlib" \
  >"$OUT/tests.log" 2>&1
tests_rc=$?
timeout 180 $PY -m experiments.bench_kernels --json="$OUT/bench.json" >"$OUT/bench.log" 2>&1
bench_rc=$?
# this card's entry of the dispatch table, from the device times above (only if the tests passed and the
# benchmark finished); copy $OUT/dispatch.json over qlora_jax/kernels/dispatch.json to commit it
$PY -m experiments.dispatch_table --bench="$OUT/bench.json" --tests_rc=$(( tests_rc != 0 ? tests_rc : bench_rc )) \
  --commit="${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" --out="$OUT/dispatch.json" \
  >"$OUT/dispatch.log" 2>&1
table_rc=$?
timeout 60 $PY -m experiments.bench_generate --repeats=5 --json="$OUT/bench_generate.json" >"$OUT/bench_generate.log" 2>&1
generate_rc=$?
timeout 60 $PY -m experiments.bench_train --shape=7b --seq=512 >"$OUT/bench_train.log" 2>&1
train_rc=$?
timeout 40 $PY -m experiments.bench_optim >"$OUT/bench_optim.log" 2>&1
optim_rc=$?
timeout 75 $PY -m experiments.bench_attention --seqs=2048,8192 >"$OUT/bench_attention.log" 2>&1
attention_rc=$?
timeout 45 $PY -m experiments.bench_remat --hidden=4096 --heads=32 --layers=4 --seq=512 --repeats=3 \
  >"$OUT/bench_remat.log" 2>&1
remat_rc=$?
timeout 30 $PY -m experiments.bench_moe --experts=8,32 --hidden=1024 --moe=1024 --tokens=2048 --repeats=3 \
  >"$OUT/bench_moe.log" 2>&1
moe_rc=$?
timeout 30 $PY -m experiments.bench_dora --hidden=4096 --heads=32 --layers=2 --seq=512 --repeats=3 \
  >"$OUT/bench_dora.log" 2>&1
dora_rc=$?

echo
echo "== kernel tests (rc=$tests_rc) =="
tail -n 15 "$OUT/tests.log"
echo
echo "== bench_kernels (rc=$bench_rc) =="
grep -v -e "^I[0-9]" -e "^W[0-9]" "$OUT/bench.log" | tail -n 60
echo
echo "== dispatch table (rc=$table_rc) =="
grep -v -e "^I[0-9]" -e "^W[0-9]" "$OUT/dispatch.log" | tail -n 4
echo
echo "== bench_generate (rc=$generate_rc) =="
grep -v -e "^I[0-9]" -e "^W[0-9]" "$OUT/bench_generate.log" | tail -n 12
echo
echo "== bench_train --shape=7b (rc=$train_rc) =="
grep -v -e "^I[0-9]" -e "^W[0-9]" "$OUT/bench_train.log" | tail -n 6
echo
echo "== bench_optim (rc=$optim_rc) =="
grep -v -e "^I[0-9]" -e "^W[0-9]" "$OUT/bench_optim.log" | tail -n 12
echo
echo "== bench_attention (rc=$attention_rc) =="
grep -v -e "^I[0-9]" -e "^W[0-9]" "$OUT/bench_attention.log" | tail -n 6
echo
echo "== bench_remat (rc=$remat_rc) =="
grep -v -e "^I[0-9]" -e "^W[0-9]" "$OUT/bench_remat.log" | tail -n 6
echo
echo "== bench_moe (rc=$moe_rc) =="
grep -v -e "^I[0-9]" -e "^W[0-9]" "$OUT/bench_moe.log" | tail -n 6
echo
echo "== bench_dora (rc=$dora_rc) =="
grep -v -e "^I[0-9]" -e "^W[0-9]" "$OUT/bench_dora.log" | tail -n 6
exit $(( tests_rc != 0 || bench_rc != 0 || generate_rc != 0 || optim_rc != 0 || train_rc != 0 || attention_rc != 0 \
  || remat_rc != 0 || moe_rc != 0 || dora_rc != 0 ))
