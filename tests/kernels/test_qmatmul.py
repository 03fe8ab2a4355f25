"""Fused dequantize·matmul (forward and custom_vjp backward) against float64 products of the
dequantized weight; dispatch, residuals and bad input."""

import json

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_config import INTERPRET, MATMUL_RTOL, run_poisoned

from qlora_jax import kernels, quant
from qlora_jax.kernels import dispatch
from qlora_jax.kernels.dispatch import Dispatch
from qlora_jax.kernels.qmatmul import QMatmulBlockSizes, _bwd_call, _fwd_call, choose_impl, kernel_supports

N, K = 128, 256  # small: interpret mode costs about one copy of the inputs per grid step


def _weight(rng, quant_type="nf4", dq=True, shape=(N, K), block_size=64):
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    return quant.quantize(w, quant_type, block_size, dq)


def _w64(qt):
    return np.asarray(quant.dequantize(qt, jnp.float32), np.float64)


def _rel_err(got, want):
    got = np.asarray(got, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("m", [1, 7, 300])
@pytest.mark.parametrize("quant_type,dq", [("nf4", True), ("nf4", False), ("fp4", True), ("int4", False)])
def test_forward_matches_float64(fresh_rng, quant_type, dq, m, dtype):
    qt = _weight(fresh_rng, quant_type, dq)
    x = jnp.asarray(fresh_rng.standard_normal((m, K)), dtype)
    bs = QMatmulBlockSizes.for_shape(m, N)
    y = run_poisoned(_fwd_call(x, qt, bs, INTERPRET))  # the rows padding x to block_m too
    assert y.shape == (m, N) and y.dtype == dtype
    want = np.asarray(x, np.float64) @ _w64(qt).T
    assert _rel_err(y, want) <= MATMUL_RTOL[dtype]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("m", [1, 7, 300])
@pytest.mark.parametrize("quant_type,dq", [("nf4", True), ("fp4", False), ("int4", True)])
def test_backward_kernel_matches_float64(fresh_rng, quant_type, dq, m, dtype):
    qt = _weight(fresh_rng, quant_type, dq)
    dy = jnp.asarray(fresh_rng.standard_normal((m, N)), dtype)
    bs = QMatmulBlockSizes.for_shape(m, N)
    dx = run_poisoned(_bwd_call(dy, qt, bs, INTERPRET))
    assert dx.shape == (m, K) and dx.dtype == dtype
    assert _rel_err(dx, np.asarray(dy, np.float64) @ _w64(qt)) <= MATMUL_RTOL[dtype]


@pytest.mark.parametrize("impl", ["pallas", "pallas_dequant", "xla"])
def test_grad_through_public_qmatmul(fresh_rng, impl):
    qt = _weight(fresh_rng, "nf4", True)
    x = jnp.asarray(fresh_rng.standard_normal((2, 5, K)), jnp.bfloat16)  # leading batch dims
    dy = jnp.asarray(fresh_rng.standard_normal((2, 5, N)), jnp.bfloat16)
    y, vjp = jax.vjp(lambda x: kernels.qmatmul(x, qt, impl=impl, interpret=INTERPRET), x)
    (dx,) = vjp(dy)
    w = _w64(qt)
    assert y.shape == (2, 5, N) and dx.shape == x.shape and dx.dtype == x.dtype
    assert _rel_err(y, np.asarray(x, np.float64) @ w.T) <= MATMUL_RTOL[jnp.bfloat16]
    assert _rel_err(dx, np.asarray(dy, np.float64) @ w) <= MATMUL_RTOL[jnp.bfloat16]


def test_grad_of_a_small_model(fresh_rng):
    """jax.grad of a loss through two quantized layers and a trainable adapter, w.r.t. the adapter
    and the input: the Pallas path agrees with the XLA path and with float64 finite structure."""
    q1, q2 = _weight(fresh_rng, "nf4", True, (K, K)), _weight(fresh_rng, "nf4", True, (N, K))
    adapter = jnp.asarray(fresh_rng.standard_normal((K, K)) * 0.05, jnp.float32)
    x = jnp.asarray(fresh_rng.standard_normal((7, K)), jnp.bfloat16)

    def loss(adapter, x, impl):
        h = kernels.qmatmul(x, q1, impl=impl, interpret=INTERPRET)
        h = jax.nn.gelu((h.astype(jnp.float32) + x.astype(jnp.float32) @ adapter).astype(jnp.bfloat16))
        return jnp.mean(kernels.qmatmul(h, q2, impl=impl, interpret=INTERPRET).astype(jnp.float32) ** 2)

    grads = jax.grad(loss, argnums=(0, 1))
    ga, gx = grads(adapter, x, "pallas")
    ra, rx = grads(adapter, x, "xla")
    assert _rel_err(ga, np.asarray(ra, np.float64)) <= 2 * MATMUL_RTOL[jnp.bfloat16]
    assert _rel_err(gx, np.asarray(rx, np.float64)) <= 2 * MATMUL_RTOL[jnp.bfloat16]


@pytest.mark.parametrize("dq", [False, True])
def test_frozen_weight_gets_zero_cotangent(fresh_rng, dq):
    qt = _weight(fresh_rng, "nf4", dq)
    x = jnp.asarray(fresh_rng.standard_normal((3, K)), jnp.bfloat16)
    _, vjp = jax.vjp(lambda x, qt: kernels.qmatmul(x, qt, impl="xla"), x, qt)
    _, dqt = vjp(jnp.ones((3, N), jnp.bfloat16))
    for leaf in jax.tree.leaves(dqt):
        if leaf.dtype == jax.dtypes.float0:
            continue
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    assert dqt.packed.dtype == jax.dtypes.float0


def test_backward_keeps_only_the_4bit_weight(fresh_rng, capsys):
    """The only residuals between forward and backward are the 4-bit weight's own arrays: no
    dequantized [N, K] copy of the weight (nor x: the weight gets no gradient) is kept."""
    qt = _weight(fresh_rng, "nf4", True)
    x = jnp.asarray(fresh_rng.standard_normal((4, K)), jnp.bfloat16)
    jax.ad_checkpoint.print_saved_residuals(lambda x, qt: kernels.qmatmul(x, qt, impl="xla").sum(), x, qt)
    saved = sorted(line.split(" from ")[0] for line in capsys.readouterr().out.strip().splitlines())
    assert saved == sorted([f"u8[{N * K // 2}]", f"u8[{N * K // 64}]", "f32[2]", "f32[]"])


class _Device:
    """What ``dispatch.for_device`` reads of a ``jax.Device``."""

    def __init__(self, platform, device_kind):
        self.platform, self.device_kind = platform, device_kind


H200 = _Device("gpu", "NVIDIA H200")


def _runs(f, *args) -> str:
    """Which implementation the jaxpr of ``f`` holds: a Pallas kernel's name prefix, else "xla"."""
    jaxpr = str(jax.make_jaxpr(f)(*args))
    for name in ("qmatmul_decode", "qmatmul_fwd", "dequantize_nf4"):
        if f"name={name}_" in jaxpr:
            return name
    assert "pallas_call" not in jaxpr
    return "xla"


def test_a_dispatch_passed_in_chooses_the_kernel_per_m(fresh_rng):
    qt = _weight(fresh_rng)
    choice = dispatch.for_device(
        H200, {"devices": {"NVIDIA H200": {"qmatmul": [[16, "pallas_decode"], [None, "pallas"]]}}}
    )
    assert choice == Dispatch("xla", ((16, "pallas_decode"), (None, "pallas")))
    run = jax.jit(kernels.qmatmul, static_argnames=("impl", "interpret"))  # a Dispatch is a static argument
    for m, want in [(1, "qmatmul_decode"), (4, "qmatmul_decode"), (16, "qmatmul_decode"), (32, "qmatmul_fwd")]:
        x = jnp.asarray(fresh_rng.standard_normal((m, K)), jnp.bfloat16)
        assert _runs(lambda x: run(x, qt, impl=choice, interpret=INTERPRET), x) == want, m
    x = jnp.asarray(fresh_rng.standard_normal((4, K)), jnp.bfloat16)
    y = run(x, qt, impl=choice, interpret=INTERPRET)
    assert _rel_err(y, np.asarray(x, np.float64) @ _w64(qt).T) <= MATMUL_RTOL[jnp.bfloat16]
    # another Dispatch is another key of jit's cache: the same x traces to another kernel
    dequant = Dispatch("pallas", ((None, "pallas_dequant"),))
    assert _runs(lambda x: run(x, qt, impl=dequant, interpret=INTERPRET), x) == "dequantize_nf4"
    assert _runs(lambda x: run(x, qt, impl=dispatch.XLA, interpret=INTERPRET), x) == "xla"


def test_choose_impl_follows_the_dispatch_and_the_shapes_the_kernels_take(fresh_rng):
    qt = _weight(fresh_rng)
    rules = [[1, "pallas_decode"], [16, "pallas"], [None, "pallas_dequant"]]
    measured = {"devices": {"NVIDIA H200": {"dequantize": "pallas", "qmatmul": rules},
                            "another card": {"qmatmul": [[None, "pallas"]]}}}  # fmt: skip
    d = dispatch.for_device(H200, measured)
    assert d.dequantize == "pallas"
    assert [choose_impl(m, jnp.bfloat16, qt, d) for m in (1, 2, 16, 17, 4096)] == (
        ["pallas_decode", "pallas", "pallas", "pallas_dequant", "pallas_dequant"]
    )
    assert choose_impl(0, jnp.bfloat16, qt, d) == "xla"  # an empty batch: not the decode kernel's 1..16
    assert choose_impl(1, jnp.float32, qt, d) == "xla"  # kernels take bf16/fp16 activations
    big_block = quant.quantize(np.ones((N, 4096), np.float32), "nf4", 4096, True)
    assert choose_impl(1, jnp.bfloat16, big_block, d) == "xla"
    short = dispatch.for_device(H200, {"devices": {"NVIDIA H200": {"qmatmul": [[16, "pallas"]]}}})
    assert choose_impl(17, jnp.bfloat16, qt, short) == "xla"  # past the last bound: the XLA path
    assert short.dequantize == "xla"
    # a kind the table does not list, and the committed table (no card verified yet): the XLA path
    assert dispatch.for_device(_Device("gpu", "unlisted card"), measured) is dispatch.XLA
    assert dispatch.for_device(H200) == dispatch.XLA == Dispatch.xla() == Dispatch()


def test_auto_is_for_device_resolved_when_called(fresh_rng):
    """Off GPU every table gives the XLA path, even one naming this very device kind: the kernels
    are GPU kernels. "auto" is for_device() of the default device."""
    qt = _weight(fresh_rng)
    x = jnp.asarray(fresh_rng.standard_normal((4, K)), jnp.bfloat16)
    here = jax.devices()[0]
    everything = {"devices": {here.device_kind: {"dequantize": "pallas", "qmatmul": [[None, "pallas"]]}}}
    if here.platform == "cpu":
        assert dispatch.for_device(here, everything) is dispatch.XLA
        assert choose_impl(4, jnp.bfloat16, qt) == "xla"
        assert _runs(lambda x: kernels.qmatmul(x, qt), x) == "xla"
    else:
        assert dispatch.for_device(here, everything) == Dispatch("pallas", ((None, "pallas"),))
    assert dispatch.for_device() == dispatch.for_device(here)
    assert _runs(lambda x: kernels.qmatmul(x, qt), x) == _runs(
        lambda x: kernels.qmatmul(x, qt, impl=dispatch.for_device()), x
    )


def test_the_kernels_hold_no_mutable_module_state():
    """What chooses a kernel is the Dispatch passed in: no module of the package keeps a list, dict
    or set that a call could read or change (as ``dispatch.override``'s stack once was)."""
    import importlib
    import pkgutil

    import qlora_jax.kernels as package

    names = ["qlora_jax.kernels"] + [f"qlora_jax.kernels.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
    assert "qlora_jax.kernels.dispatch" in names and "qlora_jax.kernels._common" in names
    for name in names:
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if not attr.startswith("__"):
                assert not isinstance(value, list | dict | set | bytearray), f"{name}.{attr}"


def test_a_dispatch_is_a_flax_module_attribute(fresh_rng):
    """LoRADense passes its ``impl`` to qmatmul: a Dispatch there selects the kernel."""
    from qlora_jax.nn import LoRADense, QuantConfig

    x = jnp.asarray(fresh_rng.standard_normal((3, K)), jnp.bfloat16)
    layer = LoRADense(N, quant=QuantConfig(), impl=Dispatch(qmatmul=((None, "pallas"),)))
    variables = layer.init(jax.random.key(0), x)
    assert _runs(lambda x: layer.apply(variables, x), x) == "qmatmul_fwd"
    assert _runs(lambda x: layer.clone(impl=dispatch.XLA).apply(variables, x), x) == "xla"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"qmatmul": [[16, "fused"]]}, r"devices\['k'\].qmatmul\[0\] must be \[max_m or null, one of"),
        ({"qmatmul": [[None, "xla"], [16, "pallas"]]}, r"max_m must ascend, with null \(no bound\) only last"),
        ({"qmatmul": [[64, "pallas"], [16, "xla"]]}, r"max_m must ascend"),
        ({"qmatmul": [[0, "pallas"]]}, r"max_m must be a positive int or null; got 0"),
        ({"qmatmul": [[32, "pallas_decode"]]}, r"qmatmul\[0\]: pallas_decode takes M <= 16; got max_m 32"),
        ({"qmatmul": [[None, "pallas_decode"]]}, r"pallas_decode takes M <= 16; got max_m None"),
        ({"dequantize": "triton"}, r"devices\['k'\].dequantize must be one of \('pallas', 'mosaic_gpu', 'xla'\)"),
    ],
)
def test_dispatch_table_entries_are_checked(entry, message):
    with pytest.raises(ValueError, match=message):
        dispatch.for_device(H200, {"devices": {"k": entry}})  # checked though it is not this device's


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(dequantize="triton"), r"Dispatch.dequantize must be one of"),
        (dict(qmatmul=((16, "pallas_decode"), (8, "pallas"))), r"Dispatch.qmatmul: max_m must ascend"),
        (dict(qmatmul=((32, "pallas_decode"),)), r"Dispatch.qmatmul\[0\]: pallas_decode takes M <= 16"),
        (dict(qmatmul=((True, "pallas"),)), r"max_m must be a positive int or null; got True"),
        (dict(qmatmul="pallas"), r"Dispatch.qmatmul must be a sequence of \(max_m, impl\) rules"),
    ],
)
def test_a_dispatch_is_checked_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Dispatch(**kwargs)


def test_a_dispatch_hashes_by_value():
    a = Dispatch("pallas", [[16, "pallas_decode"], [None, "pallas"]])  # lists, as in the JSON file
    b = Dispatch("pallas", ((16, "pallas_decode"), (None, "pallas")))
    assert a == b and hash(a) == hash(b) and a.qmatmul == b.qmatmul
    assert a != Dispatch("xla", b.qmatmul)


def test_committed_dispatch_table_is_valid_and_lists_only_verified_devices():
    table = json.loads(dispatch.TABLE_FILE.read_text())
    for kind, entry in table["devices"].items():
        dispatch.check_entry(kind, entry)
        assert entry["measured"]["commit"] and entry["measured"]["date"], kind  # where its numbers came from


def test_kernel_support_rules():
    assert kernel_supports(jnp.bfloat16, jax.eval_shape(lambda: quant.quantize(jnp.ones((4096, 11008)))))
    assert not kernel_supports(jnp.bfloat16, jax.eval_shape(lambda: quant.quantize(jnp.ones((100, 256)))))
    assert not kernel_supports(jnp.bfloat16, jax.eval_shape(lambda: quant.quantize(jnp.ones((64, 96)))))


def test_block_sizes_divide_n():
    assert QMatmulBlockSizes.for_shape(1, 11008).block_n == 32
    assert QMatmulBlockSizes.for_shape(4096, 11008).block_n == 128
    assert QMatmulBlockSizes.for_shape(4096, 48).block_n == 16


def test_bad_input_is_named(fresh_rng):
    qt = _weight(fresh_rng)
    with pytest.raises(
        ValueError, match=r"last dimension must equal the weight's in_features 256; x has shape \(3, 128\)"
    ):
        kernels.qmatmul(jnp.ones((3, 128), jnp.bfloat16), qt)
    with pytest.raises(ValueError, match="impl must be one of"):
        kernels.qmatmul(jnp.ones((3, K), jnp.bfloat16), qt, impl="triton")
    with pytest.raises(ValueError, match="impl='pallas' needs"):
        kernels.qmatmul(jnp.ones((3, K), jnp.float32), qt, impl="pallas")
    with pytest.raises(ValueError, match="2-D QuantizedTensor"):
        kernels.qmatmul(jnp.ones((3, K), jnp.bfloat16), quant.quantize(np.ones((2, N, K), np.float32)))
    with pytest.raises(ValueError, match="must be a float array"):
        kernels.qmatmul(jnp.ones((3, K), jnp.int32), qt)


def test_xla_path_materializes_the_weight_once_in_bf16(fresh_rng):
    """One fused dequantize writes the weight in x's dtype: no float32 [N, K] buffer."""
    qt = _weight(fresh_rng, "nf4", True, (512, 1024))
    x = jnp.ones((8, 1024), jnp.bfloat16)
    temp = jax.jit(kernels.qmatmul_reference).lower(x, qt).compile().memory_analysis().temp_size_in_bytes
    bf16_weight = 2 * 512 * 1024
    assert bf16_weight <= temp < bf16_weight + 4 * 512 * 1024 // 8  # a float32 copy would add 2 MiB
