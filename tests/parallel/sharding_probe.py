"""Run in a subprocess with 8 CPU devices by test_parallel.py: builds the tiny fine-tune's state on a
(2 data x 4 fsdp) mesh as the config says, takes one step, round-trips it through orbax, and prints
every leaf's partition spec and memory kind (before the step, after it, after the restore) as JSON."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import PartitionSpec as P

from experiments.configs import tiny
from qlora_jax import parallel
from qlora_jax.quant import QuantizedTensor, dequantize
from qlora_jax.train import train_lib


def describe(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        jax.tree_util.keystr(path): [str(leaf.sharding.spec), leaf.sharding.memory_kind, list(leaf.shape)]
        for path, leaf in flat
    }


def shards_dequantize_alone(frozen):
    """For each split QuantizedTensor: does every device's piece, as a QuantizedTensor of its own
    rows, dequantize to those rows of the whole tensor?"""
    out = {}
    for path, qt in jax.tree_util.tree_flatten_with_path(frozen, is_leaf=lambda x: isinstance(x, QuantizedTensor))[0]:
        if not isinstance(qt, QuantizedTensor) or qt.packed.sharding.spec != P(None, "fsdp"):
            continue  # scanned layers: [L, bytes], each layer's rows split
        ok = True
        for layer in range(qt.packed.shape[0]):
            one = jax.tree.map(lambda a, layer=layer: a[layer], qt)
            whole = np.asarray(dequantize(one, jnp.float32))
            pieces = {}
            for field in ("packed", "absmax", "nested_absmax"):
                for shard in getattr(qt, field).addressable_shards:
                    data = np.asarray(shard.data)[layer]
                    pieces.setdefault(shard.device, {})[field] = (shard.index[1].start, data)
            for d in pieces.values():
                start = d["packed"][0] * 2 // qt.shape[1]  # first row held by the device
                rows = d["packed"][1].size * 2 // qt.shape[1]
                piece = one.replace(
                    packed=d["packed"][1], absmax=d["absmax"][1], nested_absmax=d["nested_absmax"][1],
                    offset=np.asarray(one.offset), shape=(rows, qt.shape[1]),
                )  # fmt: skip
                ok &= bool(np.array_equal(np.asarray(dequantize(piece, jnp.float32)), whole[start : start + rows]))
        out[jax.tree_util.keystr(path)] = ok
    return out


def main(workdir, params_mode, opt_mode):
    c = tiny.get_config("small")  # its batch of 8; the model and the data are the probe's own:
    # hidden 256: q_proj [256, 256] splits into whole nested blocks over 4 devices, k_proj [128, 256]
    # does not (512 blocks / 4 = 128 < 256) and stays replicated
    c.model.hidden_size, c.model.intermediate_size, c.model.num_hidden_layers = 256, 512, 2
    c.data.num_train, c.data.source_max_len, c.data.target_max_len = 16, 24, 8
    c.train.paged_min_size = 1024  # pages the q_proj adapter moments ([2, 16, 256]), not the scalars
    c.mesh.data, c.mesh.fsdp = 2, 4
    c.sharding.params, c.sharding.opt_state = params_mode, opt_mode
    mesh = parallel.make_mesh(c.mesh.to_dict())
    built = train_lib.setup(c, mesh)
    frozen, state = built.base, built.state
    batches = train_lib.build_data(c, built.tokenizer).train
    assert jax.tree.map(lambda x: x.sharding, state) == built.state_shardings  # the layout's, as built
    step = train_lib.jit_train_step(built.model, built.optimizer, built.state_shardings, c.seed)
    before = describe(state)
    batch = {k: v[None] for k, v in next(batches).items()}
    with jax.set_mesh(mesh):
        state, metrics = step(state, frozen, parallel.global_batch(batch, parallel.batch_sharding(mesh, 3, 1)))
    after = describe(state)
    mgr = ocp.CheckpointManager(workdir, options=ocp.CheckpointManagerOptions(create=True))
    mgr.save(1, args=ocp.args.StandardSave(state))
    mgr.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = mgr.restore(1, args=ocp.args.StandardRestore(abstract))
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True))
    print(
        json.dumps(
            {
                "base": describe(frozen),
                "shards_dequantize_alone": shards_dequantize_alone(frozen),
                "before": before,
                "after": after,
                "restored": describe(restored),
                "restored_equal": same,
                "loss": float(metrics["loss"]),
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
