r"""Streaming quantize-at-load: wall time and peak host memory of loading a ~1B LLaMA in NF4+DQ.

    python -m experiments.bench_load                   # TinyLlama-1.1B shape, bf16, 4 shards
    python -m experiments.bench_load --layers=4        # quicker

A random LLaMA-shaped bf16 checkpoint is written, sharded, to a temporary directory by a child
process (so its memory does not count here), then loaded with ``load_pretrained(quant=NF4+DQ)``.
Reported: wall time, peak RSS of this process (``resource.getrusage``), the RSS before loading
(JAX runtime and imports: the baseline measured in the same run), the loaded model's bytes, and
the largest tensor. The goal: peak RSS <= baseline + model bytes + 2 x largest tensor. A naive
load that materializes the checkpoint first would hold its 2 bytes/param on top. glibc's malloc
is set to a fixed mmap threshold (``--malloc_mmap_threshold``; the same as exporting
``MALLOC_MMAP_THRESHOLD_=1048576``), without which freed tensors linger in the heap.
"""

from __future__ import annotations

import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_LAYERS = flags.DEFINE_integer("layers", 22, "Decoder layers (22: TinyLlama-1.1B).")
_HIDDEN = flags.DEFINE_integer("hidden", 2048, "hidden_size.")
_INTER = flags.DEFINE_integer("intermediate", 5632, "intermediate_size.")
_VOCAB = flags.DEFINE_integer("vocab", 32000, "vocab_size.")
_SHARDS = flags.DEFINE_integer("shards", 4, "Number of safetensors shards.")
_KEEP = flags.DEFINE_string("dir", None, "Write/reuse the checkpoint here instead of a temp dir.")
_MMAP_THRESHOLD = flags.DEFINE_integer(
    "malloc_mmap_threshold",
    1 << 20,
    "glibc M_MMAP_THRESHOLD in bytes (0: leave glibc's dynamic default). A fixed threshold makes "
    "every large buffer its own mapping, returned to the OS when freed; glibc's default raises "
    "the threshold after the first large free, and freed tensors then stay in the heap.",
)

_WRITER = r"""
import json, sys, pathlib, numpy as np, ml_dtypes
from safetensors.numpy import save_file
out, cfg, shards = pathlib.Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
d, f, v, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
for i in range(L):
    p = f"model.layers.{i}."
    shapes.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                   p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                   p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                   p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
                   p + "post_attention_layernorm.weight": (d,)})
names = list(shapes)
groups = [names[k::shards] for k in range(shards)]
rng = np.random.default_rng(0)
weight_map = {}
for k, group in enumerate(groups):
    fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
    save_file({n: (rng.standard_normal(shapes[n], np.float32) * 0.02).astype(ml_dtypes.bfloat16) for n in group},
              str(out / fname), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(group, fname))
(out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
(out / "config.json").write_text(json.dumps(cfg))
"""


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv):
    del argv
    cfg = {
        "model_type": "llama",
        "vocab_size": _VOCAB.value,
        "hidden_size": _HIDDEN.value,
        "intermediate_size": _INTER.value,
        "num_hidden_layers": _LAYERS.value,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }
    tmp = None if _KEEP.value else tempfile.TemporaryDirectory()
    root = pathlib.Path(_KEEP.value or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "config.json").exists():
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", _WRITER, str(root), json.dumps(cfg), str(_SHARDS.value)], check=True)
        print(f"wrote checkpoint in {time.perf_counter() - t:.1f} s to {root}")
    disk = sum(p.stat().st_size for p in root.glob("*.safetensors"))

    import jax
    import jax.numpy as jnp
    import numpy as np

    from qlora_jax.checkpoints import load_pretrained
    from qlora_jax.nn import QuantConfig

    if _MMAP_THRESHOLD.value:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, _MMAP_THRESHOLD.value)  # -3: M_MMAP_THRESHOLD
    # The baseline: the runtime plus the quantize executables for every linear shape (compiled
    # code is the runtime's, whatever the model size), warmed up on zeros.
    from qlora_jax import quant

    kv = d_model = cfg["hidden_size"]
    kv = d_model // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    inter = cfg["intermediate_size"]
    for shape in {(d_model, d_model), (kv, d_model), (inter, d_model), (d_model, inter)}:
        jax.block_until_ready(quant.quantize(jnp.zeros(shape, jnp.bfloat16), "nf4", 64, True))
    base_mb = _rss_mb()
    t = time.perf_counter()
    _, variables = load_pretrained(root, quant=QuantConfig("nf4", 64, True), progress=False)
    jax.block_until_ready(variables)
    wall = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    leaves = jax.tree.leaves(variables["base"])
    model_mb = sum(np.dtype(x.dtype).itemsize * x.size for x in leaves) / 2**20
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    largest_mb = 2 * max(v * d, d * f) / 2**20  # bf16 on disk
    params = disk / 2  # bf16
    budget = base_mb + model_mb + 2 * largest_mb
    print(f"checkpoint: {params / 1e9:.2f} B params, {disk / 2**20:.0f} MiB bf16 in {_SHARDS.value} shards")
    print(f"load (NF4 + double quant): {wall:.1f} s, {params / wall / 1e6:.0f} M params/s")
    print(f"RSS before load (runtime + compiled quantize executables): {base_mb:.0f} MiB")
    print(f"loaded model (frozen tree): {model_mb:.0f} MiB; largest tensor {largest_mb:.0f} MiB")
    print(f"peak RSS: {peak_mb:.0f} MiB; budget baseline + model + 2 x largest = {budget:.0f} MiB "
          f"-> {peak_mb / budget:.2f}x budget")  # fmt: skip
    print(f"naive (whole bf16 checkpoint resident + model): {base_mb + disk / 2**20 + model_mb:.0f} MiB")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    app.run(main)
