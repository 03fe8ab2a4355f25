"""Run in a subprocess by test_parallel.py (8 CPU devices in one process, or 4 in each of two):
load a float32 checkpoint straight into fsdp=8 shards, recording every device's live bytes after
each placement, and compare the result with loading on one device and then splitting.

Prints one JSON line: per device (of this process) the peak live bytes during the load, the final
base shard bytes and the largest in-flight tensor piece; the bytes this process read from the
file, the file's tensor bytes, and whether every shard equals the load-then-split's bytes.
"""

import json
import sys

import jax
import numpy as np
from safetensors import safe_open

from qlora_jax import parallel, quant
from qlora_jax.checkpoints import hf, shards
from qlora_jax.nn import QuantConfig


def device_bytes(arrays) -> dict[str, int]:
    """Bytes on each of this process's devices. Counted from the sharding, not from
    ``shard.data``: those per-shard views would be live arrays themselves and count twice."""
    out: dict[str, int] = {}
    for a in arrays:
        piece = int(np.prod(a.sharding.shard_shape(a.shape), dtype=np.int64)) * a.dtype.itemsize
        for d in a.sharding.addressable_devices:
            out[str(d)] = out.get(str(d), 0) + piece
    return out


def main(path: str, coordinator: str, num_processes: int, process_id: int) -> None:
    if coordinator:
        parallel.initialize_distributed(coordinator, num_processes, process_id)
    mesh = parallel.make_mesh({"data": 1, "fsdp": -1})
    peak: dict[str, int] = {}
    piece: dict[str, int] = {}
    opened = []
    loading = [True]

    def record():
        for d, n in device_bytes(jax.live_arrays()).items():
            peak[d] = max(peak.get(d, 0), n)

    def watch(fn, in_flight=False):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            if not loading[0]:
                return out
            record()
            if in_flight:  # a full-precision piece read from the file
                for d, n in device_bytes([out]).items():
                    piece[d] = max(piece.get(d, 0), n)
            return out

        return wrapped

    shards.read_placed = watch(shards.read_placed, in_flight=True)
    shards.quantize_placed = watch(shards.quantize_placed)
    shards.set_layer = watch(shards.set_layer)
    open_checkpoint = hf.open_checkpoint

    def capture(p):
        out = open_checkpoint(p)
        opened.append(out[3])
        return out

    hf.open_checkpoint = capture
    kw = dict(quant=QuantConfig(), dtype=np.float32, progress=False, report_quant_error=False)
    _, v = hf.load_pretrained(path, mesh=mesh, **kw)
    loading[0] = False
    read = opened[0].bytes_read
    final = device_bytes(jax.tree.leaves(v["base"]))

    # today's way: the whole model loaded on one device, then split
    _, ref = hf.load_pretrained(path, **kw)
    ref = parallel.place(jax.device_get(ref["base"]), parallel.frozen_shardings(ref["base"], mesh))
    same = True
    for a, b in zip(jax.tree.leaves(v["base"]), jax.tree.leaves(ref), strict=True):
        same &= a.sharding.spec == b.sharding.spec and a.dtype == b.dtype
        for sa, sb in zip(a.addressable_shards, b.addressable_shards, strict=True):
            same &= sa.index == sb.index and np.array_equal(np.asarray(sa.data), np.asarray(sb.data))
    split = sum(
        1
        for x in jax.tree.leaves(v["base"], is_leaf=quant.is_quantized)
        if quant.is_quantized(x) and x.packed.sharding.spec[-1]
    )
    with safe_open(f"{path}/model.safetensors", "np") as f:
        total = sum(f.get_tensor(k).nbytes for k in f.keys())
    print(json.dumps({
        "peak": peak, "final": final, "piece": piece, "read": int(read), "total": int(total), "same": bool(same),
        "split_quantized": split, "devices": len(mesh.devices.flat),
    }))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], *(sys.argv[2:3] or [""]), *map(int, sys.argv[3:5] or (0, -1)))
