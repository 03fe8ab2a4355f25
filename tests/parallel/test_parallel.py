"""Scale-out: mesh and sharding rules, 8 simulated CPU devices against 1, and two real processes on
localhost (jax.distributed, gloo CPU collectives) against 1.

Runs that need several devices are subprocesses: the device count is fixed when JAX starts.
The comparisons run in float32 compute, so the only differences are fp32 sums taken in another
order (all-reduces, split matmuls). Measured over 6 steps: losses within 3e-7 relative (checked at
1e-5); gradient and update norms within 1.1e-5 (checked at 1e-4: gradients are sums of per-token
terms that largely cancel, so reordering them costs more relative precision). A mis-sharded batch
or base moves the losses by > 1e-3.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from qlora_jax import parallel
from qlora_jax.quant import bits_per_param, quantize

ROOT = Path(__file__).resolve().parents[2]
SMALL = [  # tiny.py:small, with what these runs need of their own (float32: reduction order aside, exact)
    "--config=experiments/configs/tiny.py:small",
    "--config.model.intermediate_size=256",
    "--config.data.num_train=32",
    "--config.data.source_max_len=24",
    "--config.data.target_max_len=8",
    "--config.train.learning_rate=0.01",
    "--config.train.dtype=float32",
    "--config.train.steps=6",
    "--config.log_every=1",
    "--config.eval_every=3",
    "--config.checkpoint_every=3",
    "--config.num_generate=2",
    "--config.progress=False",
]
MESH_2x4 = [
    "--config.mesh.data=2",
    "--config.mesh.fsdp=4",
    "--config.sharding.params=fsdp",
    "--config.sharding.opt_state=fsdp",
]
RTOL = {"loss": 1e-5, "eval_loss": 1e-5, "grad_norm": 1e-4, "update_norm": 1e-4}


def _env(devices: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return env


def _finetune(workdir, devices: int, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "experiments.finetune", f"--workdir={workdir}", *SMALL, *extra]
    return subprocess.run(cmd, cwd=ROOT, env=_env(devices), capture_output=True, text=True, check=True)


def _metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(0, 7))  # step 0: before training
    for key, rtol in RTOL.items():
        a = np.array([r.get(key, np.nan) for r in got])
        b = np.array([r.get(key, np.nan) for r in want])
        np.testing.assert_allclose(a, b, rtol=rtol, equal_nan=True, err_msg=key)
    assert [r.get("tokens") for r in got] == [r.get("tokens") for r in want]


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_device")
    _finetune(workdir, 1)
    return workdir


def test_make_mesh_fills_minus_one_and_names_the_config_key():
    mesh = parallel.make_mesh({"data": -1, "fsdp": 1})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1}
    with pytest.raises(ValueError, match=r"config.mesh=\{'data': 2, 'fsdp': 1\} needs 2 devices; there are 1"):
        parallel.make_mesh({"data": 2, "fsdp": 1})
    with pytest.raises(ValueError, match=r"config.mesh: unknown axes \['model'\]"):
        parallel.make_mesh({"data": -1, "model": 2})
    with pytest.raises(ValueError, match="at most one -1"):
        parallel.make_mesh({"data": -1, "fsdp": -1})


def test_process_flags_without_a_coordinator_are_an_error(monkeypatch):
    for name in ("QLORA_COORDINATOR_ADDRESS", "QLORA_NUM_PROCESSES", "QLORA_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert parallel.initialize_distributed() is False  # one process: nothing to initialize
    with pytest.raises(ValueError, match=r"num_processes=2, process_id=1 given without a coordinator address"):
        parallel.initialize_distributed(num_processes=2, process_id=1)
    monkeypatch.setenv("QLORA_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match=r"environment variable QLORA_NUM_PROCESSES must be an integer; got 'two'"):
        parallel.initialize_distributed()


def test_batch_size_must_split_over_data_and_fsdp():
    mesh = AbstractMesh((2, 4), parallel.AXES, axis_types=(AxisType.Auto,) * 2)
    parallel.check_batch_size(mesh, 16)
    with pytest.raises(ValueError, match=r"config.train.batch_size=12 must be divisible by data × fsdp = 8"):
        parallel.check_batch_size(mesh, 12)


@pytest.mark.parametrize(
    "shape, dq, split",
    [
        ((256, 256), True, True),  # 1024 blocks: 256 per device = one nested block each
        ((128, 256), True, False),  # 512 blocks: 128 per device, not a whole nested block
        ((128, 256), False, True),  # no nested blocks to respect
        ((6, 64), False, False),  # rows not divisible by 4
        ((4, 48), False, False),  # 1 row of 48 per device: not a whole block of 64
    ],
)
def test_quantized_tensor_splits_only_into_whole_rows_blocks_and_nested_blocks(shape, dq, split):
    mesh = AbstractMesh((2, 4), parallel.AXES, axis_types=(AxisType.Auto,) * 2)
    qt = quantize(jnp.ones(shape, jnp.float32), "nf4", 64, dq, 256)
    s = parallel.quantized_sharding(qt, mesh)
    want = P("fsdp") if split else P()
    assert s.packed.spec == s.absmax.spec == want
    if dq:
        assert s.nested_absmax.spec == want and s.offset.spec == P()


def test_sharding_of_frozen_params_and_paged_state_on_2x4_mesh(tmp_path):
    """Adapters split over fsdp, optimizer state replicated (config.sharding), paged moments in
    pinned_host; unchanged by a step and by an orbax round trip; each split 4-bit weight's
    pieces dequantize on their own to their rows."""
    cmd = [sys.executable, "tests/parallel/sharding_probe.py", str(tmp_path / "ckpt"), "fsdp", "replicated"]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(8), capture_output=True, text=True, check=True)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    frozen = probe["base"]
    q, k = (
        "['layers']['self_attn']['q_proj']['kernel']",
        "['layers']['self_attn']['k_proj']['kernel']",
    )  # scanned layers: a leading [L] axis, each layer's rows split
    assert [frozen[f"{q}.{f}"][0] for f in ("packed", "absmax", "nested_absmax", "offset")] == [
        "P(None, 'fsdp')", "P(None, 'fsdp')", "P(None, 'fsdp')", "P()",
    ]  # fmt: skip
    assert {frozen[f"{k}.{f}"][0] for f in ("packed", "absmax", "nested_absmax", "offset")} == {"P()"}
    alone = probe["shards_dequantize_alone"]
    assert q in alone and any("gate_proj" in name for name in alone) and all(alone.values())

    state = probe["before"]
    lora_a = {n: v for n, v in state.items() if n.endswith("['q_proj']['lora_a']")}
    param = lora_a.pop(".params['layers']['self_attn']['q_proj']['lora_a']")
    assert param == ["P(None, None, 'fsdp')", "device", [2, 16, 256]]
    assert sorted(v[1] for v in lora_a.values()) == ["pinned_host", "pinned_host"]  # Adam's mu and nu
    assert {v[0] for v in lora_a.values()} == {"P()"}
    small = [v for n, v in state.items() if n.startswith(".opt_state") and np.prod(v[2]) < 1024]
    assert small and {v[1] for v in small} == {"device"}  # counts and small moments stay on device
    assert probe["after"] == state and probe["restored"] == state
    assert probe["restored_equal"]


def test_eight_devices_train_like_one(one_device, tmp_path):
    _finetune(tmp_path, 8, *MESH_2x4)
    _assert_same_run(_metrics(tmp_path), _metrics(one_device))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(one_device, tmp_path):
    """Two processes with 4 CPU devices each form the 2 × 4 mesh over gloo; process 0 alone writes."""
    port = _free_port()

    def launch(i):
        cmd = [sys.executable, "-m", "experiments.finetune", f"--workdir={tmp_path}", *SMALL, *MESH_2x4]
        cmd += [f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"]
        return subprocess.Popen(cmd, cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = [launch(i) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    _assert_same_run(_metrics(tmp_path), _metrics(one_device))  # one line per step: one writer
    assert "final:" in outs[0][0] and "final:" not in outs[1][0]
    assert (tmp_path / "export" / "adapter" / "adapter_model.safetensors").exists()
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]


def _checkpoint(tmp_path, fmt: str = "float32", **moe) -> Path:
    """A float32 checkpoint whose 4-bit linears all split block-aligned over 8 devices; or
    (``fmt="bnb4bit"``) the same saved in bitsandbytes' 4-bit format. ``moe``: LlamaConfig fields
    of a mixture-of-experts model instead."""
    import jax
    import jax.numpy as jnp

    from qlora_jax.checkpoints import export_hf, load_pretrained, read_config, save_pretrained_4bit
    from qlora_jax.nn import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4, **moe)
    model = LlamaForCausalLM(cfg, dtype=jnp.float32, scan_layers=False)
    export_hf(tmp_path / "ckpt", cfg, model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["base"])
    if fmt == "float32":
        return tmp_path / "ckpt"
    _, v = load_pretrained(tmp_path / "ckpt", dtype=jnp.float32, scan_layers=False, progress=False)
    save_pretrained_4bit(tmp_path / fmt, read_config(tmp_path / "ckpt")[1], v["base"], compute_dtype="float32")
    return tmp_path / fmt


def _check_load(out: dict, fmt: str, quantized_piece: float = 0.0) -> None:
    """``quantized_piece``: a piece's 4-bit bytes per full-precision byte, when the peak may also hold
    the piece just quantized (a MoE expert: quantized into the layer's stack of experts)."""
    assert out["same"]  # every shard equals the one-device load split afterwards, byte for byte
    assert out["split_quantized"] == 7  # every linear of the (scanned) block is split, none replicated
    for device, peak in out["peak"].items():  # never more than its shards plus the tensor in flight
        assert peak <= out["final"][device] + out["piece"][device] * (1 + quantized_piece), (device, out)
        if fmt == "float32":
            assert out["final"][device] < out["total"] / out["devices"]  # 4-bit shards: far below a 1/8 copy


@pytest.mark.parametrize("fmt", ["float32", "bnb4bit"])
def test_load_goes_straight_into_eight_shards(tmp_path, fmt):
    path = _checkpoint(tmp_path, fmt)
    cmd = [sys.executable, str(ROOT / "tests" / "parallel" / "load_probe.py"), str(path)]
    out = json.loads(subprocess.run(cmd, cwd=ROOT, env=_env(8), capture_output=True, text=True, check=True).stdout)
    assert out["devices"] == 8 and len(out["peak"]) == 8
    _check_load(out, fmt)
    # one process holds every shard: it reads every byte once (a bitsandbytes checkpoint: plus one
    # weight's quant_state JSON, a few hundred bytes read first for the source dtype it records)
    assert 0 <= out["read"] - out["total"] <= (1024 if fmt == "bnb4bit" else 0), out


@pytest.mark.parametrize("fmt", ["float32", "bnb4bit"])
def test_a_moe_checkpoint_loads_straight_into_eight_shards(tmp_path, fmt):
    """Qwen3-MoE, 4 experts: each expert's tensor is read into its slice of the stacked [E] linear,
    split by rows over 8 devices like a dense linear (a bitsandbytes checkpoint stores the experts
    unquantized: quantized as they load)."""
    moe = dict(model_type="qwen3_moe", qk_norm=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=512)
    path = _checkpoint(tmp_path, fmt, **moe)
    cmd = [sys.executable, str(ROOT / "tests" / "parallel" / "load_probe.py"), str(path)]
    out = json.loads(subprocess.run(cmd, cwd=ROOT, env=_env(8), capture_output=True, text=True, check=True).stdout)
    assert out["devices"] == 8
    # q, k, v, o and the three expert linears split, the router replicated; the last expert's float32
    # piece and its NF4 + DQ form (4.127 bits per 32) are live together beyond the final shards
    _check_load(out, fmt, quantized_piece=bits_per_param() / 32)
    assert 0 <= out["read"] - out["total"] <= (1024 if fmt == "bnb4bit" else 0), out


@pytest.mark.parametrize("fmt", ["float32", "bnb4bit"])
def test_two_processes_each_read_half_of_the_checkpoint(tmp_path, fmt):
    path = _checkpoint(tmp_path, fmt)
    port = _free_port()
    cmd = [sys.executable, str(ROOT / "tests" / "parallel" / "load_probe.py"), str(path), f"localhost:{port}", "2"]
    procs = [
        subprocess.Popen(
            [*cmd, str(i)], cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    for stdout, _ in outs:
        out = json.loads(stdout.splitlines()[-1])
        assert out["devices"] == 8 and len(out["peak"]) == 4  # this process's devices only
        _check_load(out, fmt)
        # only its devices' rows (the 2 KiB of norms and embedding columns it cuts alike)
        assert 0.49 < out["read"] / out["total"] < 0.51, out
