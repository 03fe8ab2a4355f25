"""The memory planner: its exact parts are the train state's, checked against independent counts
(the paper's bits per parameter, LLaMA-7B's shapes by hand, a real init, real optimizer states,
the mesh's shardings); its estimate within 15 % of XLA's.

The validation compiles the real train step (``memory.compiled_memory`` = ``make_train_step``
under ``jax.jit(..., donate_argnums=0)``, abstract inputs) and compares the planner's device
total with ``argument + output - alias + temp`` of ``memory_analysis()``, with non-paged
optimizers on the CPU (jax 0.11.2 counts paged host state as device arguments there).
"""

import inspect
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app, flags
from jax.sharding import AbstractMesh, AxisType

from experiments import plan as plan_cli
from qlora_jax import parallel
from qlora_jax.nn import LlamaConfig, LlamaForCausalLM, LoRAConfig, QuantConfig, model_config, preset
from qlora_jax.nn.lora import split_params
from qlora_jax.optim import OPTIMIZERS, OptimizerConfig, build_optimizer, paged, state_bytes_by_memory_kind
from qlora_jax.quant import is_quantized
from qlora_jax.train import memory
from qlora_jax.train.state import abstract_variables

TOLERANCE = 0.15
MiB, GiB = 2**20, 2**30


def nf4_dq_bytes(n: int) -> int:
    """An NF4+DQ tensor of ``n`` elements (block 64, nested 256, whole blocks): 4-bit codes, a
    uint8 absmax code per block, a float32 scale per 256 blocks and one float32 offset."""
    assert n % (64 * 256) == 0
    return n // 2 + n // 64 + 4 * (n // (64 * 256)) + 4


# --- exact parts against independent counts ------------------------------------------------------

SQUARE = LlamaConfig(
    vocab_size=64, hidden_size=4096, intermediate_size=4096, num_hidden_layers=1, num_attention_heads=32,
    num_key_value_heads=32,
)  # fmt: skip  # one block of seven 4096 x 4096 linears


def test_4bit_base_is_the_papers_bits_per_param():
    n = 4096 * 4096
    p = memory.plan(SQUARE, lora=None)
    assert p.frozen_quantized == 7 * nf4_dq_bytes(n)
    # 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter (the paper's), plus one float32 offset
    assert (8 * p.frozen_quantized / 7 - 32) / n == pytest.approx(4.127, abs=5e-4)
    assert 8 * memory.plan(SQUARE, QuantConfig(double_quant=False), lora=None).frozen_quantized / (7 * n) == 4.5
    assert p.frozen_other == 2 * 64 * 4096 * 2 + 3 * 4096 * 2  # bf16 embed + lm_head, 2 block norms + final
    # fsdp=4: 4096 rows / 4 = 1024 rows of 65,536 blocks = 256 nested blocks each; the offset replicated
    four = memory.plan(SQUARE, lora=None, batch=4, mesh="fsdp=4")
    assert four.frozen_quantized == 7 * ((nf4_dq_bytes(n) - 4) // 4 + 4)
    assert four.gathered_block == 7 * nf4_dq_bytes(n) + 2 * 4096 * 2  # one block, unsharded


LLAMA7B_LORA_PARAMS = 32 * 64 * (4 * (4096 + 4096) + 3 * (4096 + 11008))  # r=64 on the 7 linears of 32 blocks


def test_llama_7b_by_hand():
    p = memory.plan(preset("llama-7b"))
    assert LLAMA7B_LORA_PARAMS == 159_907_840  # the paper's table: "160M"
    assert p.frozen_quantized == 32 * (4 * nf4_dq_bytes(4096 * 4096) + 3 * nf4_dq_bytes(4096 * 11008))
    assert p.frozen_other == 2 * 32000 * 4096 * 2 + (2 * 32 + 1) * 4096 * 2
    assert p.adapters == 2 * LLAMA7B_LORA_PARAMS  # bf16
    assert p.grads == p.adapters
    # paged AdamW: float32 mu and nu of every adapter on the host (each stacked leaf >= 1e5
    # elements); the device keeps AdamW's and the schedule's int32 step counts
    assert p.optimizer_host == 2 * 4 * LLAMA7B_LORA_PARAMS
    assert p.optimizer_device == 8
    sharded = memory.plan(preset("llama-7b"), batch=4, mesh="fsdp=4", shard_params=True)
    assert (sharded.adapters, sharded.optimizer_host) == (p.adapters // 4, p.optimizer_host // 4)
    assert sharded.optimizer_device == 8  # scalars cannot split (the old hand count said 8 // 4 = 2)


def test_load_peak_is_the_base_plus_the_largest_checkpoint_piece():
    one = memory.plan(preset("llama-7b"))
    two = memory.plan(preset("llama-7b"), batch=2, mesh="fsdp=2")
    base = lambda p: p.frozen_quantized + p.frozen_other  # noqa: E731
    # the largest LLaMA-7B tensor: embed_tokens / lm_head, 32000 x 4096 in bf16, its rows split
    assert one.load_peak == base(one) + 32000 * 4096 * 2
    assert two.load_peak == base(two) + 32000 * 4096 * 2 // 2
    # LLaMA-2-70B: lm_head (32000 x 8192) beats gate_proj (28672 x 8192)
    p70 = memory.plan(preset("llama-2-70b"), batch=2, mesh="fsdp=2", shard_params=True)
    assert p70.load_peak == base(p70) + 32000 * 8192 * 2 // 2


def test_verdict_needs_the_load_to_fit_too():
    # a small model with a large vocabulary: loading the embedding peaks above the train step
    cfg = LlamaConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=2,
                      num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    p = memory.plan(cfg, seq_len=8)
    assert p.load_peak > p.device_bytes
    device = int((p.device_bytes + p.load_peak) / 2 + memory.RESERVE_BYTES) * 100 // 95
    q = memory.plan(cfg, seq_len=8, device_memory=device)
    assert q.device_bytes <= q.usable < q.load_peak and q.fits is False
    assert "does not fit" in q.table() and "(the load peak)" in q.table()


def test_llama_2_70b_fits_two_24gib_gpus():
    # the FSDP-QLoRA claim: 70B on 2 x 24 GB, one 512-token sequence per device, paged AdamW
    # (256 MiB chunks), remat, adapters and optimizer state sharded too; no gradient accumulator
    kw = dict(batch=2, mesh="fsdp=2", shard_params=True, chunk_bytes=256 * MiB, device_memory=24 * GiB)
    p = memory.plan(preset("llama-2-70b"), **kw)
    assert p.fits and p.load_peak < p.device_bytes
    # with the recipe's 16 accumulation steps the accumulator (790 MiB) tips it over
    assert not memory.plan(preset("llama-2-70b"), accum_steps=16, **kw).fits


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


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("quant", [QuantConfig(), QuantConfig(block_size=128, nested_block_size=64), None])
def test_frozen_and_adapter_bytes_equal_the_models_variables(name, quant, scan_layers):
    cfg = TINY_CONFIGS[name]
    lora = LoRAConfig(rank=8, targets=("q_proj", "v_proj", "down_proj"), dtype=jnp.bfloat16)
    model = LlamaForCausalLM(cfg, lora=lora, quant=quant, dtype=jnp.bfloat16, scan_layers=scan_layers)
    params, frozen = split_params(abstract_variables(model))
    p = memory.plan(cfg, quant, lora, batch=1, seq_len=8, scan_layers=scan_layers)
    qts = [x for x in jax.tree.leaves(frozen, is_leaf=is_quantized) if is_quantized(x)]
    assert p.frozen_quantized == sum(memory.tree_nbytes(x) for x in qts)
    assert p.frozen_quantized + p.frozen_other == memory.tree_nbytes(frozen)
    assert p.adapters == memory.tree_nbytes(params)


@pytest.mark.slow
def test_frozen_bytes_equal_a_real_init():
    cfg = TINY_CONFIGS["llama-gqa"]
    model = LlamaForCausalLM(cfg, lora=LoRAConfig(rank=4), quant=QuantConfig(), dtype=jnp.bfloat16)
    params, frozen = split_params(jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 8), jnp.int32)))
    p = memory.plan(cfg, QuantConfig(), LoRAConfig(rank=4))
    assert p.frozen_quantized + p.frozen_other == sum(x.nbytes for x in jax.tree.leaves(frozen))
    assert p.adapters == sum(x.nbytes for x in jax.tree.leaves(params))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_optimizer_bytes_by_memory_kind_equal_a_real_state(optimizer, dtype):
    # rank 8 on hidden 64 / inter 1000: leaves of 512 to 8000 elements per layer (< 4096: float32
    # 8-bit moments); min_size 1000 pages some leaves and keeps others on the device.
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=1000, num_attention_heads=4)
    lora = LoRAConfig(rank=8, dtype=dtype)
    for scan_layers in (True, False):
        model = LlamaForCausalLM(cfg, lora=lora, scan_layers=scan_layers)
        params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_variables(model)["params"])
        tx = build_optimizer(OptimizerConfig(optimizer=optimizer, paged_min_size=1000)).tx
        actual = state_bytes_by_memory_kind(tx.init(params))
        is_paged = optimizer.startswith("paged_")
        kw = dict(paged=is_paged, optimizer=optimizer.removeprefix("paged_"), min_size=1000, scan_layers=scan_layers)
        p = memory.plan(cfg, None, lora, batch=1, seq_len=8, **kw)
        assert {"device": p.optimizer_device, "pinned_host": p.optimizer_host} == {"pinned_host": 0, **actual}
        assert p.optimizer_host > 0 if is_paged else p.optimizer_host == 0


def test_paging_defaults_are_the_builders():
    default = inspect.signature(memory.plan).parameters["min_size"].default
    assert default == OptimizerConfig().paged_min_size == inspect.signature(paged).parameters["min_size"].default
    assert default == 100_000  # bitsandbytes' 1e5
    with pytest.raises(ValueError, match="optimizer must be one of"):
        memory.plan(preset("llama-7b"), optimizer="paged_adamw")


def test_per_device_bytes_equal_the_meshs_shard_shapes():
    # the bytes each NamedSharding of the train state puts on one device (shard_shape), fsdp=4
    cfg = LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_attention_heads=4)
    opt = memory.optimizer_config("adamw", paged=True, min_size=1000)
    mesh = AbstractMesh((1, 4), parallel.AXES, axis_types=(AxisType.Auto,) * 2)
    for shard_params in (False, True):
        layout = memory.train_layout(cfg, optimizer=opt, fsdp=4, shard_params=shard_params)
        shardings = layout.shardings(mesh)
        on_mesh = {}
        for part in ("base", "params", "opt_state"):
            leaves = jax.tree.leaves(getattr(layout.abstract, part))
            for x, s in zip(leaves, jax.tree.leaves(getattr(shardings, part)), strict=True):
                on_mesh[part] = on_mesh.get(part, 0) + int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
        p = memory.plan(cfg, batch=4, mesh="fsdp=4", min_size=1000, shard_params=shard_params)
        assert p.frozen_quantized + p.frozen_other == on_mesh["base"] < memory.tree_nbytes(layout.abstract.base)
        assert p.adapters == on_mesh["params"]
        assert p.optimizer_device + p.optimizer_host == on_mesh["opt_state"]


def test_mesh_divides_the_batch_and_the_base():
    cfg = preset("llama-7b")
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


def test_recipe_table_is_pinned():
    # notebook 04's table (GiB): LLaMA 7B-65B under the recipe. Reading the train state reproduced
    # the earlier bytes exactly; chunked attention then added, to the one recomputed block, what its
    # backward pass saves: the float32 output and a log-sum-exp per query and head, 4 (q + H) bytes
    # per token (7B: 512 x 16,512 = 8,454,144 bytes)
    recipe = dict(accum_steps=16, chunk_bytes=256 * MiB)
    models = ("llama-7b", "llama-13b", "llama-33b", "llama-65b")
    got = {m: memory.plan(preset(m), **recipe).device_bytes for m in models}
    before = {"llama-7b": 5_649_662_856, "llama-13b": 9_905_090_664, "llama-33b": 22_282_547_608}
    before["llama-65b"] = 42_116_597_960
    added = {m: 512 * 4 * (preset(m).hidden_size + preset(m).num_attention_heads) for m in models}
    assert got == {m: before[m] + added[m] for m in models}


# (name, config, plan/compile kwargs). Small but not trivial: activations and weights both count.
VALIDATION = [
    ("q-remat-dropout", dict(layers=2, quant=True, dropout=0.1, remat=True, lora_dtype=jnp.float32)),
    ("q-noremat-dropout", dict(layers=2, quant=True, dropout=0.1, remat=False, lora_dtype=jnp.float32)),
    ("bf16-noremat-L4", dict(layers=4, quant=False, dropout=0.0, remat=False, lora_dtype=jnp.float32)),
    ("q-remat-bf16-adapters", dict(layers=2, quant=True, dropout=0.0, remat=True, lora_dtype=jnp.bfloat16)),
    (
        "q-save-linears-L4",
        dict(layers=4, quant=True, dropout=0.0, remat=True, lora_dtype=jnp.bfloat16, remat_policy="save_linears"),
    ),
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
    policy = c.get("remat_policy", "nothing_saveable")
    kw = dict(batch=2, seq_len=128, remat=c["remat"], paged=False, remat_policy=policy)
    p = memory.plan(cfg, quant, lora, backend="cpu", **kw)
    measured = memory.compiled_memory(cfg, quant, lora, **kw)
    assert p.host_bytes == 0
    assert abs(p.device_bytes / measured["peak"] - 1) <= TOLERANCE, (p.device_bytes, measured)


# MoE: (model_type, experts, dispatch, remat). XLA:CPU lowers the sorted dispatch's ragged dot to a
# dot of every row with every expert, so there a block holds E·k rows per token (the plan's
# backend="cpu" model; measured 0.98-1.09 of the compiled step at E = 4, 8 and I = 256, 512); an
# accelerator's grouped matmul holds k (not validated: no GPU run yet).
MOE_VALIDATION = [
    ("qwen3_moe", 8, "sorted", True),
    ("qwen3_moe", 4, "sorted", False),
    ("qwen3_moe", 8, "dense", True),
    ("qwen3_moe", 4, "dense", False),
    ("qwen2_moe", 8, "sorted", True),
    ("mixtral", 4, "dense", True),
]


@pytest.mark.slow
@pytest.mark.parametrize("model_type,experts,dispatch,remat", MOE_VALIDATION)
def test_a_moe_plan_is_within_15_percent_of_the_compiled_step_on_cpu(model_type, experts, dispatch, remat):
    """Adapters on every expert (r=16): each dispatch's expert rows per token (k sorted, E dense)
    and the experts' adapter outputs are in the estimate."""
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU activation model (backend='cpu') is validated on the CPU backend")
    extra = dict(shared_expert_intermediate_size=384, qkv_bias=True) if model_type == "qwen2_moe" else {}
    cfg = LlamaConfig(
        model_type=model_type, vocab_size=1000, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, num_experts=experts,
        num_experts_per_tok=2, **extra,
    )  # fmt: skip
    lora = LoRAConfig(rank=16, dropout=0.0, dtype=jnp.float32, targets=cfg.linear_names)
    kw = dict(batch=2, seq_len=128, remat=remat, paged=False, moe_dispatch=dispatch)
    p = memory.plan(cfg, QuantConfig(), lora, backend="cpu", **kw)
    measured = memory.compiled_memory(cfg, QuantConfig(), lora, **kw)
    assert abs(p.device_bytes / measured["peak"] - 1) <= TOLERANCE, (p.device_bytes, measured)


@pytest.mark.slow
@pytest.mark.parametrize("layers", [2, 4])
def test_what_save_linears_adds_is_planned_within_15_percent_on_cpu(layers):
    """Keeping every linear's output (remat_policy='save_linears') against recomputing the block:
    the compiled step's extra bytes (measured +1.31 MB at 2 blocks, +3.67 MB at 4) and the
    planner's (+1.36, +4.08 MB: L - 1 blocks' outputs beyond what recomputing one block held)."""
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU activation model (backend='cpu') is validated on the CPU backend")
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4)  # fmt: skip
    lora = LoRAConfig(rank=16, dropout=0.0, dtype=jnp.bfloat16)
    planned, measured = {}, {}
    for policy in ("nothing_saveable", "save_linears", "offload_linears"):
        kw = dict(batch=2, seq_len=128, remat=True, paged=False, remat_policy=policy)
        planned[policy] = memory.plan(cfg, QuantConfig(), lora, backend="cpu", **kw)
        measured[policy] = memory.compiled_memory(cfg, QuantConfig(), lora, **kw)["peak"]
    added = measured["save_linears"] - measured["nothing_saveable"]
    assert added > 0
    assert abs((planned["save_linears"].device_bytes - planned["nothing_saveable"].device_bytes) / added - 1) <= 0.15
    # XLA:CPU keeps "offloaded" outputs on the device (measured within 2 % of save_linears's), and so
    # does the CPU plan; a GPU plan moves them to the host
    assert abs(measured["offload_linears"] / measured["save_linears"] - 1) <= 0.02
    assert planned["offload_linears"].host_bytes == 0
    gpu = memory.plan(cfg, QuantConfig(), lora, batch=2, seq_len=128, paged=False, remat_policy="offload_linears")
    assert gpu.host_bytes == gpu.activations["offloaded"] > 0


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
        # FSDP-QLoRA: LLaMA-2-70B on 2 x 24 GiB, one sequence per device, no accumulator
        (
            ("--model=llama-2-70b", "--mesh=fsdp=2", "--shard_params", "--batch=2", "--accum_steps=1"),
            "verdict: fits",
        ),
    ],
)
def test_cli_verdicts(capsys, args, verdict):
    out = run_cli(capsys, *args)
    assert verdict in out
    assert "frozen base, 4-bit linears" in out and "load peak" in out


def test_cli_reads_a_hf_config(tmp_path, capsys):
    from qlora_jax.checkpoints import config_to_hf

    cfg = LlamaConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, qkv_bias=True, tie_word_embeddings=True,
                      model_type="qwen2")  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    assert model_config(str(tmp_path)) == model_config(str(tmp_path / "config.json"))
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


def test_phi3s_fused_linears_are_planned_as_stored(capsys):
    """Phi-3 (qkv_proj, gate_up_proj): the base and adapter bytes of the model's own variables, and
    an adapter per fused linear, r (in + out) each; the CLI's default targets are the model's."""
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, fused_projections=True, model_type="phi3")  # fmt: skip
    lora = LoRAConfig(rank=8, targets=("qkv_proj", "gate_up_proj"), dtype=jnp.bfloat16)
    model = LlamaForCausalLM(cfg, lora=lora, quant=QuantConfig(), dtype=jnp.bfloat16)
    params, frozen = split_params(abstract_variables(model))
    p = memory.plan(cfg, QuantConfig(), lora, batch=1, seq_len=8)
    assert p.frozen_quantized + p.frozen_other == memory.tree_nbytes(frozen)
    assert p.adapters == memory.tree_nbytes(params) == 2 * 8 * ((64 + 128) + (64 + 192)) * 2  # bf16, 2 layers
    hf = pathlib.Path(__file__).parents[1] / "fixtures" / "hf" / "phi3"
    assert "verdict: fits" in run_cli(capsys, f"--model={hf}")
    with pytest.raises(app.UsageError, match=r"\[.q_proj.\] name no linear of this phi3 model"):
        run_cli(capsys, f"--model={hf}", "--targets=q_proj")
