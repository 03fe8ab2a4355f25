"""The memory planner: exact parts equal the real layouts, estimates within 15 % of XLA's.

The validation compiles the real train step (``memory.compiled_memory`` = ``make_train_step``
under ``jax.jit(..., donate_argnums=0)``, abstract inputs) and compares the planner's device
total with ``argument + output - alias + temp`` of ``memory_analysis()``, with non-paged
optimizers on the CPU (jax 0.11.2 counts paged host state as device arguments there).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import app, flags
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from experiments import plan as plan_cli
from qlora_jax import memory, parallel
from qlora_jax.nn import LlamaConfig, LlamaForCausalLM, LoRAConfig, QuantConfig
from qlora_jax.nn.lora import split_params
from qlora_jax.optim import paged, state_bytes_by_memory_kind
from qlora_jax.quant import is_quantized

TOLERANCE = 0.15


@pytest.mark.parametrize(
    "shape", [(64,), (1, 63), (5, 13), (3, 1000), (128, 320), (17, 129), (256, 256 * 64 + 5), (7, 11, 9)]
)
@pytest.mark.parametrize(
    "quant",
    [QuantConfig(), QuantConfig(double_quant=False), QuantConfig("fp4", 128, True, 64), QuantConfig("int4", 32)],
    ids=["nf4-dq", "nf4", "fp4-128-dq64", "int4-32"],
)
def test_quantized_nbytes_equals_quantize_layout(shape, quant):
    # abstract quantize: the same layout as a real one (checked below) without a compile per shape
    qt = jax.eval_shape(quant.quantize, jax.ShapeDtypeStruct(shape, jnp.float32))
    assert memory.quantized_nbytes(shape, quant) == qt.nbytes


@pytest.mark.parametrize("shape", [(5, 13), (17, 129)])
def test_quantized_nbytes_equals_a_real_quantize(shape):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for quant in (QuantConfig(), QuantConfig(double_quant=False)):
        assert memory.quantized_nbytes(shape, quant) == quant.quantize(w).nbytes


def test_bits_per_param_is_the_papers():
    # a 4096 x 4096 linear stores 4 + 8/64 + 32/(64*256) bits per parameter (the paper's 4.127)
    # plus its one float32 offset
    n = 4096 * 4096
    assert 8 * memory.quantized_nbytes((4096, 4096), QuantConfig()) == 8 * n * (4 + 8 / 64 + 32 / (64 * 256)) / 8 + 32
    assert 8 * memory.quantized_nbytes((4096, 4096), QuantConfig(double_quant=False)) / n == 4.5


TINY_CONFIGS = {
    "llama-gqa": LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_attention_heads=4),
    "qwen2-tied": LlamaConfig(
        vocab_size=257, hidden_size=48, intermediate_size=80, num_attention_heads=6, num_key_value_heads=2,
        qkv_bias=True, tie_word_embeddings=True, model_type="qwen2",
    ),
    "biases-headdim": LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=72, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=40, attention_bias=True, mlp_bias=True,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("quant", [QuantConfig(), QuantConfig(block_size=128, nested_block_size=64), None])
def test_frozen_and_adapter_bytes_equal_eval_shape(name, quant):
    cfg = TINY_CONFIGS[name]
    lora = LoRAConfig(rank=8, targets=("q_proj", "v_proj", "down_proj"), dtype=jnp.bfloat16)
    params, frozen = split_params(memory.abstract_variables(cfg, quant, lora, jnp.bfloat16))
    fb = memory.frozen_bytes(cfg, quant, jnp.bfloat16)
    quantized = sum(memory.tree_nbytes(x) for x in jax.tree.leaves(frozen, is_leaf=is_quantized) if is_quantized(x))
    assert fb.quantized == quantized
    assert fb.quantized + fb.other == memory.tree_nbytes(frozen)
    p = memory.plan(cfg, quant, lora, batch=1, seq_len=8)
    assert p.adapters == memory.tree_nbytes(params)
    assert sorted(memory.lora_shapes(cfg, lora)) == sorted(x.shape for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_frozen_bytes_equal_a_real_init():
    cfg = TINY_CONFIGS["llama-gqa"]
    model = LlamaForCausalLM(cfg, lora=LoRAConfig(rank=4), quant=QuantConfig(), dtype=jnp.bfloat16)
    params, frozen = split_params(jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 8), jnp.int32)))
    fb = memory.frozen_bytes(cfg, QuantConfig(), jnp.bfloat16)
    assert fb.quantized + fb.other == sum(x.nbytes for x in jax.tree.leaves(frozen))
    assert memory.plan(cfg, QuantConfig(), LoRAConfig(rank=4)).adapters == sum(
        x.nbytes for x in jax.tree.leaves(params)
    )


@pytest.mark.parametrize("optimizer", memory.OPTIMIZERS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_optimizer_bytes_by_memory_kind_equal_paged_init(optimizer, dtype):
    # rank 8 on hidden 64 / inter 200: leaves of 512, 1600 (< 4096: float32 8-bit moments) and
    # 8000 elements; min_size 1000 pages some leaves and keeps others on the device.
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=1000, num_attention_heads=4)
    lora = LoRAConfig(rank=8, dtype=dtype)
    abstract = memory.abstract_variables(cfg, None, lora)["params"]
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
    tx, _ = memory.build_optimizer(optimizer, paged=True, min_size=1000)
    actual = state_bytes_by_memory_kind(tx.init(params))
    expected = memory.optimizer_state_bytes(memory.lora_shapes(cfg, lora), optimizer, True, 1000)
    assert expected == actual
    assert expected["pinned_host"] > 0 and expected["device"] > 8
    unpaged = memory.optimizer_state_bytes(memory.lora_shapes(cfg, lora), optimizer, paged=False)
    assert unpaged == {"device": sum(actual.values())}


def test_paged_default_is_bitsandbytes_min_size():
    tx = paged(optax.adamw(1e-3))
    params = {"big": jnp.zeros((100_000,)), "small": jnp.zeros((99_999,))}
    state = state_bytes_by_memory_kind(tx.init(params))
    assert state["pinned_host"] == memory.optimizer_state_bytes([(100_000,)], schedule=False)["pinned_host"]


def test_fsdp_sharding_rule():
    q = QuantConfig()
    full = memory.quantized_nbytes((4096, 4096), q)
    # 4096*4096/64 = 262144 blocks; / (4 * 256) divides: everything but the offset splits
    assert memory.quantized_nbytes_per_device((4096, 4096), q, 4) == (full - 4) // 4 + 4
    # out rows not divisible by fsdp: replicated
    assert memory.quantized_nbytes_per_device((4098, 4096), q, 4) == memory.quantized_nbytes((4098, 4096), q)
    # rows split but a shard is not whole blocks (3 * 40 = 120 elements): replicated
    assert memory.quantized_nbytes_per_device((12, 40), q, 4) == memory.quantized_nbytes((12, 40), q)
    # blocks split, nested blocks do not (32 blocks per device < 256): replicated, as on the mesh
    assert memory.quantized_nbytes_per_device((64, 64), q, 2) == memory.quantized_nbytes((64, 64), q)
    # the same bytes as the shardings the training mesh gives (qlora_jax.parallel)
    mesh = AbstractMesh((1, 4), parallel.AXES, axis_types=(AxisType.Auto,) * 2)
    for shape, cfg in [
        ((4096, 4096), q),
        ((256, 256), q),
        ((128, 256), q),
        ((128, 256), QuantConfig(double_quant=False)),
    ]:
        qt = jax.eval_shape(lambda shape=shape, cfg=cfg: cfg.quantize(jnp.ones(shape, jnp.float32)))
        shardings = parallel.quantized_sharding(qt, mesh)
        on_mesh = sum(
            leaf.size * leaf.dtype.itemsize // (4 if sh.spec == P("fsdp") else 1)
            for leaf, sh in zip(jax.tree.leaves(qt), jax.tree.leaves(shardings), strict=True)
        )
        assert memory.quantized_nbytes_per_device(shape, cfg, 4) == on_mesh, shape
    assert memory.array_nbytes_per_device((32000, 4096), 2, 8) == 32000 * 4096 * 2 // 8
    assert memory.array_nbytes_per_device((7, 9), 2, 8) == 7 * 9 * 2


def test_mesh_divides_the_batch_and_the_base():
    cfg = plan_cli.model_config("llama-7b")
    one = memory.plan(cfg, batch=8)
    four = memory.plan(cfg, batch=8, mesh={"data": 1, "fsdp": 4})
    assert four.frozen_quantized == pytest.approx(one.frozen_quantized / 4, rel=1e-4)
    assert four.activations["saved"] == one.activations["saved"] // 4
    assert four.gathered_block > 0 and one.gathered_block == 0
    assert four.adapters == one.adapters  # replicated unless shard_params
    assert memory.plan(cfg, batch=8, mesh="fsdp=4", shard_params=True).adapters == one.adapters // 4
    with pytest.raises(ValueError, match="does not divide"):
        memory.plan(cfg, batch=6, mesh={"data": 4})
    with pytest.raises(ValueError, match="mesh axes"):
        memory.plan(cfg, mesh={"tensor": 2})


# (name, config, plan/compile kwargs). Small but not trivial: activations and weights both count.
VALIDATION = [
    ("q-remat-dropout", dict(layers=2, quant=True, dropout=0.1, remat=True, lora_dtype=jnp.float32)),
    ("q-noremat-dropout", dict(layers=2, quant=True, dropout=0.1, remat=False, lora_dtype=jnp.float32)),
    ("bf16-noremat-L4", dict(layers=4, quant=False, dropout=0.0, remat=False, lora_dtype=jnp.float32)),
    ("q-remat-bf16-adapters", dict(layers=2, quant=True, dropout=0.0, remat=True, lora_dtype=jnp.bfloat16)),
]
# Not here: paged optimizers and accum_steps > 1 on XLA:CPU. There the paged moments and the
# new ones count as argument/output bytes and the accumulation loop keeps extra buffers (paged +
# accum 2 measured 33 % above the plan); on an H100 the recipe's paged + accum 16 step of a
# 4-block LLaMA-7B is within 1 % (test_plan_within_15_percent_of_compiled_step_on_gpu).


@pytest.mark.slow
@pytest.mark.parametrize("name,c", VALIDATION, ids=[v[0] for v in VALIDATION])
def test_plan_within_15_percent_of_compiled_step_on_cpu(name, c):
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU activation model (backend='cpu') is validated on the CPU backend")
    cfg = LlamaConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=c["layers"],
        num_attention_heads=4, num_key_value_heads=4,
    )  # fmt: skip
    quant = QuantConfig() if c["quant"] else None
    lora = LoRAConfig(rank=16, dropout=c["dropout"], dtype=c["lora_dtype"])
    kw = dict(batch=2, seq_len=128, remat=c["remat"], paged=False)
    p = memory.plan(cfg, quant, lora, backend="cpu", **kw)
    measured = memory.compiled_memory(cfg, quant, lora, **kw)
    assert p.host_bytes == 0
    assert abs(p.device_bytes / measured["peak"] - 1) <= TOLERANCE, (p.device_bytes, measured)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (tools/gpu_check.sh)")
def test_plan_within_15_percent_of_compiled_step_on_gpu():
    # LLaMA-7B's shapes, 4 of its 32 blocks, the recipe's settings (measured on an H100: +2.1 %)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=4,
                      num_attention_heads=32, num_key_value_heads=32)  # fmt: skip
    lora = LoRAConfig(dtype=jnp.bfloat16)
    for is_paged, accum in ((False, 1), (True, 16)):  # H100: +2.1 %, +0.8 %
        kw = dict(batch=1, seq_len=512, remat=True, paged=is_paged, accum_steps=accum)
        p = memory.plan(cfg, QuantConfig(), lora, **kw)
        measured = memory.compiled_memory(cfg, QuantConfig(), lora, **kw)
        assert measured["host_argument"] == p.host_bytes
        assert abs(p.device_bytes / measured["peak"] - 1) <= TOLERANCE, (p.device_bytes, measured)


# --- the CLI -----------------------------------------------------------------------------------


def run_cli(capsys, *args) -> str:
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["plan", *args])
    try:
        plan_cli.main(["plan"])
    finally:
        flags.FLAGS.unparse_flags()
    return capsys.readouterr().out


@pytest.mark.parametrize(
    "args,verdict",
    [
        # the recipe (configs/llama_alpaca.py: paged moments updated 256 MiB at a time) is the default
        (("--model=llama-33b", "--device_memory=24GiB"), "verdict: fits"),
        (("--model=llama-65b", "--device_memory=48GiB"), "verdict: fits"),
        (("--model=llama-65b", "--device_memory=24GiB"), "verdict: does not fit"),
        # all paged (float32) moments on the device at once (chunk_bytes=None): 5.5 GiB more at
        # 33B, 9.3 GiB at 65B, over 24 and 48 GiB
        (("--model=llama-33b", "--device_memory=24GiB", "--chunk_bytes=none"), "verdict: does not fit"),
        (("--model=llama-65b", "--device_memory=48GiB", "--chunk_bytes=none"), "verdict: does not fit"),
        (("--model=llama-7b", "--device_memory=12GB", "--lora_dtype=float32", "--remat=false"), "does not fit"),
    ],
)
def test_cli_verdicts(capsys, args, verdict):
    out = run_cli(capsys, *args)
    assert verdict in out
    assert "frozen base, 4-bit linears" in out


def test_cli_reads_a_hf_config(tmp_path, capsys):
    from qlora_jax.nn.llama import config_to_hf

    cfg = LlamaConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, qkv_bias=True, tie_word_embeddings=True,
                      model_type="qwen2")  # fmt: skip
    (tmp_path / "config.json").write_text(__import__("json").dumps(config_to_hf(cfg)))
    assert plan_cli.model_config(str(tmp_path)) == plan_cli.model_config(str(tmp_path / "config.json"))
    out = run_cli(capsys, f"--model={tmp_path}", "--device_memory=8GiB")
    assert "verdict: fits" in out


def test_parse_bytes():
    assert plan_cli.parse_bytes("24GB") == 24 * 10**9
    assert plan_cli.parse_bytes("24GiB") == 24 * 2**30
    assert plan_cli.parse_bytes("80e9") == 80 * 10**9
    assert plan_cli.parse_bytes("1.5 gib") == 3 * 2**29


@pytest.mark.parametrize(
    "args,message",
    [
        (("--device_memory=24XB",), "--device_memory"),
        (("--device_memory=-3GB",), "--device_memory"),
        (("--chunk_bytes=lots",), "--chunk_bytes"),
        (("--model=llama-9000b",), "--model"),
        (
            ("--mesh=data=2", "--batch=3"),
            r"batch=3 does not divide over the mesh's data x fsdp = 2 devices \(batch, mesh\)",
        ),
        (("--mesh=data:2",), "mesh"),
        # the planner accepts exactly what training accepts (qlora_jax.train.validate)
        (("--block_size=48",), r"--block_size: must be one of \(32, 64, .*\); got 48 \(config.quant.block_size"),
        (("--block_size=0",), r"--block_size: must be one of"),
        (("--rank=0",), r"--rank: must be >= 1 with train.trainable='lora'"),
        (("--dropout=1.0",), r"--dropout: must be >= 0 and < 1; got 1.0"),
        (("--accum_steps=0",), r"--accum_steps: must be an integer >= 1"),
        (("--targets=q_proj,qkv",), r"--targets: names \['qkv'\]"),
        (("--seq_len=0",), r"--seq_len must be >= 1"),
    ],
)
def test_cli_bad_input_names_the_flag(capsys, args, message):
    with pytest.raises(app.UsageError, match=message):
        run_cli(capsys, *args)
