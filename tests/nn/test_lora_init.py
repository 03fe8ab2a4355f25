"""Residual inits (PiSSA, OLoRA, LoftQ; ``qlora_jax.nn.lora_init``): against float64
reimplementations, PEFT 0.21's initializations and its conversion to plain LoRA
(tests/fixtures/make_peft_in_fixtures.py), and what they do to a 4-bit base's error."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from hf_fixtures import HF, byte_checkpoint
from safetensors.numpy import load_file

from qlora_jax import quant
from qlora_jax.checkpoints import export_peft_adapter, load_peft_adapter, load_pretrained
from qlora_jax.checkpoints.peft import peft_tensor_name
from qlora_jax.nn import LoRAConfig, QuantConfig
from qlora_jax.nn import lora_init as li

PEFT = HF.parent / "peft"
R, ALPHA = 4, 8.0
S = ALPHA / R


def _matrix(seed=0, out=96, inn=128, decay=0.8):
    """A weight with a decaying spectrum, as trained weights have."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(out, out)))
    v, _ = np.linalg.qr(rng.normal(size=(inn, inn)))
    s = 0.5 * decay ** np.arange(min(out, inn))
    return (u[:, : len(s)] * s) @ v[: len(s)] / 4


def _aligned(a, a_ref):
    """``a``'s rows with the signs that match ``a_ref``'s (an SVD or QR factor's sign is free)."""
    signs = np.sign(np.sum(np.asarray(a, np.float64) * a_ref, axis=-1, keepdims=True))
    return np.asarray(a, np.float64) * signs, signs


def test_pissa_and_olora_equal_float64_reimplementations():
    w = _matrix()
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    root = np.sqrt(s[:R] / S)
    want = {"pissa": (root[:, None] * vt[:R], u[:, :R] * root)}
    q, r = np.linalg.qr(w)
    want["olora"] = (r[:R], q[:, :R])
    for kind, (a64, b64) in want.items():
        residual, a, b = getattr(li, kind)(jnp.asarray(w, jnp.float32), R, S)
        a, signs = _aligned(a, a64)
        np.testing.assert_allclose(a, a64, atol=1e-5 * np.abs(a64).max(), err_msg=kind)
        np.testing.assert_allclose(np.asarray(b) * signs.T, b64, atol=1e-5 * np.abs(b64).max(), err_msg=kind)
        np.testing.assert_allclose(residual, w - S * b64 @ a64, atol=1e-6 * np.abs(w).max(), err_msg=kind)


def test_randomized_pissa_is_the_range_finder_and_converges_to_the_exact_one():
    """``pissa_niter_<k>`` (r samples, as ``torch.svd_lowrank``): the same Gaussian draws through a
    float64 range finder give its factors; and each subspace iteration brings the rank-r part closer
    to the exact SVD's (spectrum halving per value: measured 0.18, 0.0047 of the largest entry at
    k = 0, 4)."""
    w64 = _matrix(1, decay=0.5)
    w = jnp.asarray(w64, jnp.float32)
    key = jax.random.key(3)
    g = np.asarray(jax.random.normal(key, (w.shape[1], R), jnp.float32), np.float64)
    q, _ = np.linalg.qr(w64 @ g)
    for _ in range(4):
        z, _ = np.linalg.qr(w64.T @ q)
        q, _ = np.linalg.qr(w64 @ z)
    ub, sv, vt = np.linalg.svd(q.T @ w64, full_matrices=False)
    root = np.sqrt(sv / S)
    a64, b64 = root[:, None] * vt, (q @ ub) * root
    _, a, b = li.pissa(w, R, S, 4, key)
    a, signs = _aligned(a, a64)
    np.testing.assert_allclose(a, a64, atol=1e-4 * np.abs(a64).max())
    np.testing.assert_allclose(np.asarray(b) * signs.T, b64, atol=1e-4 * np.abs(b64).max())
    exact = np.asarray(w - li.pissa(w, R, S)[0])
    errs = [float(np.abs(np.asarray(w - li.pissa(w, R, S, n, key)[0]) - exact).max()) for n in (0, 1, 2, 4)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.01 * np.abs(exact).max() < errs[0], errs


def test_loftq_alternates_quantization_and_svd_as_a_float64_reimplementation():
    """The loop in float64 with the same NF4 quantizer: the final base codes are the same and the
    adapters' product agrees; each alternation lowers ||W - (Q + sBA)|| here, every one below plain
    NF4's error."""
    w = _matrix(2)
    storage = QuantConfig()
    target = w
    errors = []
    for it in range(1, 4):
        qt = storage.quantize(jnp.asarray(target, jnp.float32))
        res = w - np.asarray(quant.dequantize(qt, jnp.float32), np.float64)
        u, s, vt = np.linalg.svd(res, full_matrices=False)
        root = np.sqrt(s[:R] / S)
        a64, b64 = root[:, None] * vt[:R], u[:, :R] * root
        pre, a, b = li.loftq(jnp.asarray(w, jnp.float32), R, S, storage, it)
        ours = storage.quantize(pre)
        np.testing.assert_array_equal(ours.packed, qt.packed)
        np.testing.assert_allclose(S * np.asarray(b) @ np.asarray(a), S * b64 @ a64, atol=1e-5 * np.abs(w).max())
        errors.append(li.reconstruction_error(jnp.asarray(w, jnp.float32), ours, a, b, S))
        target = w - S * b64 @ a64
    plain = li.reconstruction_error(jnp.asarray(w, jnp.float32), storage.quantize(jnp.asarray(w, jnp.float32)),
                                    a, 0 * b, 0.0)  # fmt: skip
    assert errors[0] < plain and errors[2] < errors[0], (plain, errors)


def _peft_tree(d):
    """A PEFT adapter file as our unrolled params tree (lora_a / lora_b)."""
    flat = {}
    for name, x in load_file(d / "adapter_model.safetensors").items():
        parts = name.split(".")
        flat[(f"layers_{parts[4]}", *parts[5:-2], {"lora_A": "lora_a", "lora_B": "lora_b"}[parts[-2]])] = x
    return flat


@pytest.mark.parametrize("kind", ["pissa", "olora"])
def test_the_residual_init_at_load_is_pefts(kind):
    """load_pretrained(lora.init=kind) on the float32 LLaMA GQA fixture: the residual base weights
    and the adapters (up to each component's sign) equal PEFT's initialization, and the model's
    logits are still the checkpoint's."""
    src = PEFT / f"llama_gqa_{kind}_r4"
    lora = LoRAConfig(rank=R, alpha=ALPHA, dropout=0.0, init=kind)
    model, v = load_pretrained(HF / "llama_gqa", quant=None, lora=lora, dtype=jnp.float32, progress=False,
                               scan_layers=False)  # fmt: skip
    residual = dict(np.load(src / "residual.npz"))
    base = traverse_util.flatten_dict(v["base"])
    for name, want in residual.items():  # model.layers.0.self_attn.q_proj.weight
        parts = name.split(".")
        path = (f"layers_{parts[2]}", *parts[3:-1], "kernel")
        if path not in base:
            continue  # embeddings, norms: not targets
        np.testing.assert_allclose(base[path], want, atol=1e-5 * np.abs(want).max(), err_msg=name)
    theirs = _peft_tree(src / "init")
    ours = traverse_util.flatten_dict(v["params"])
    assert ours.keys() == theirs.keys()
    for path in [p for p in ours if p[-1] == "lora_a"]:
        a, signs = _aligned(ours[path], theirs[path])
        b = np.asarray(ours[(*path[:-1], "lora_b")]) * signs.T
        tol = 1e-4 * np.abs(theirs[path]).max()
        np.testing.assert_allclose(a, theirs[path], atol=tol, err_msg=str(path))
        np.testing.assert_allclose(b, theirs[(*path[:-1], "lora_b")], atol=1e-4 * np.abs(b).max(), err_msg=str(path))
    ref = dict(np.load(HF / "llama_gqa" / "reference.npz"))
    logits = np.asarray(model.apply(v, ref["input_ids"], ref["attention_mask"], ref["position_ids"]))
    real = ref["attention_mask"].astype(bool)
    assert np.abs(logits - ref["logits"])[real].max() <= 1e-5 * np.abs(ref["logits"][real]).max()


@pytest.mark.parametrize("kind", ["pissa", "olora"])
def test_a_trained_residual_adapter_converts_to_pefts_plain_lora(tmp_path, kind):
    """PEFT's moved adapter (the first r rows of its converted file) trained from its init, converted
    by export_peft_adapter(initial=...): PEFT's converted file, tensor for tensor, r=8 and alpha 16;
    loaded onto the original weights it gives the logits PEFT's model had on its residual base."""
    src = PEFT / f"llama_gqa_{kind}_r4"
    converted, init = _peft_tree(src / "converted"), _peft_tree(src / "init")
    moved = {p: x[:R] if p[-1] == "lora_a" else x[:, :R] for p, x in converted.items()}
    lora = LoRAConfig(rank=R, alpha=ALPHA, dropout=0.0, init=kind)
    unflat = traverse_util.unflatten_dict
    export_peft_adapter(tmp_path, unflat(moved), lora, None, initial=unflat(init))
    ours = load_file(tmp_path / "adapter_model.safetensors")
    theirs = load_file(src / "converted" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    model, v = load_peft_adapter(
        *load_pretrained(HF / "llama_gqa", quant=None, lora=None, dtype=jnp.float32, progress=False), tmp_path
    )
    assert (model.lora.rank, model.lora.alpha, model.lora.scale) == (8, 16.0, S)
    ref = dict(np.load(src / "reference.npz"))
    logits = np.asarray(model.apply(v, ref["input_ids"], ref["attention_mask"], ref["position_ids"]))
    real = ref["attention_mask"].astype(bool)
    scale = np.abs(ref["logits"][real]).max()
    assert np.abs(logits - ref["logits"])[real].max() <= 1e-4 * scale
    plain = load_pretrained(HF / "llama_gqa", quant=None, lora=None, dtype=jnp.float32, progress=False)
    base_logits = np.asarray(plain[0].apply(plain[1], ref["input_ids"], ref["attention_mask"], ref["position_ids"]))
    assert np.abs(base_logits - ref["logits"])[real].max() > 1e-2 * scale  # the training moved them


def test_an_unconverted_residual_adapter_names_its_init(tmp_path):
    lora = LoRAConfig(rank=R, alpha=ALPHA, dropout=0.0, init="pissa_niter_4")
    _, v = load_pretrained(HF / "llama_gqa", quant=None, lora=lora, dtype=jnp.float32, progress=False)
    export_peft_adapter(tmp_path, v["params"], lora, None)
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa_niter_4'.*PiSSA's residual base"):
        load_peft_adapter(*load_pretrained(HF / "llama_gqa", quant=None, progress=False), tmp_path)


@pytest.mark.parametrize("kind", ["pissa", "olora", "loftq"])
def test_on_a_4bit_base_the_init_reports_its_reconstruction_error(kind):
    """NF4 + DQ: the logged ||W - (Q + sBA)|| / ||W|| per target (r=4 of 64-128 wide weights:
    PiSSA and LoftQ take some of the quantization error into the adapters, measured 0.083 and 0.075
    at 3 iterations against plain NF4's 0.092; OLoRA barely: 0.0917), and the base stored is the
    quantized residual."""
    report = {}
    lora = LoRAConfig(rank=R, alpha=ALPHA, dropout=0.0, init=kind, loftq_iter=3)
    _, v = load_pretrained(HF / "llama_gqa", quant=QuantConfig(), lora=lora, dtype=jnp.float32, progress=False,
                           scan_layers=False, init_report=report)  # fmt: skip
    assert len(report) == 2 * 7  # every target of both layers
    init = np.median([e["init"] for e in report.values()])
    plain = np.median([e["plain"] for e in report.values()])
    assert init < plain if kind != "olora" else init < 1.01 * plain, (init, plain)
    qt = v["base"]["layers_0"]["mlp"]["down_proj"]["kernel"]
    plain, pv = load_pretrained(HF / "llama_gqa", quant=None, dtype=jnp.float32, progress=False, scan_layers=False)
    w = pv["base"]["layers_0"]["mlp"]["down_proj"]["kernel"]  # the checkpoint's float32 weight
    a, b = (v["params"]["layers_0"]["mlp"]["down_proj"][k] for k in ("lora_a", "lora_b"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert li.reconstruction_error(jnp.asarray(w), qt, a, b, S) == pytest.approx(report[name]["init"], rel=1e-5)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(quant=None, lora=LoRAConfig(rank=4, init="loftq")), "init='loftq' initializes against a quantized base"),
        (dict(lora=LoRAConfig(rank=200, init="pissa")), "needs rank <= min"),
        (dict(lora=LoRAConfig(rank=4, init="pissa", use_dora=True)), "with use_dora is not implemented"),
    ],
)
def test_a_residual_init_it_cannot_do_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        load_pretrained(HF / "llama_gqa", **{"progress": False, "dtype": jnp.float32, **kw})


def test_a_4bit_checkpoint_cannot_be_split_again():
    with pytest.raises(ValueError, match="stores them in 4 bits already"):
        load_pretrained(HF / "llama_bnb4bit", lora=LoRAConfig(rank=4, init="olora"), progress=False)


def test_peft_names_hold_for_the_init_file():
    assert peft_tensor_name(("layers_1", "mlp", "up_proj", "lora_a")) == (
        "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"
    )


@pytest.mark.slow
def test_a_pissa_fine_tune_exports_a_plain_lora_for_the_original_weights(tmp_path):
    """``--config.lora.init=pissa`` through the entry point (float32, 16-bit base): ``export/adapter``
    (PEFT's conversion, rank 2r) on the original checkpoint computes what the trained model did —
    its logits equal those of ``export/merged`` (residual base + trained adapter, merged, bf16) to
    bf16 rounding, where dropping the initial adapters' subtraction is off by far more."""
    import dataclasses

    from finetune_cli import run

    ckpt = byte_checkpoint(tmp_path, "llama_gqa")
    run(tmp_path / "run", f"--config.model_path={ckpt}", "--config.lora.init=pissa",
        "--config.quant.enabled=False", "--config.train.dtype=float32", "--config.train.steps=3",
        "--config.lora.dropout=0.0", "--config.export.merged=True")  # fmt: skip
    export = tmp_path / "run" / "export"
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)), jnp.int32)  # byte tokens
    model, v = load_peft_adapter(
        *load_pretrained(ckpt, quant=None, dtype=jnp.float32, progress=False), export / "adapter"
    )
    assert model.lora.rank == 2 * 16  # tiny.py's r=16, doubled by the conversion
    merged_model, mv = load_pretrained(export / "merged", quant=None, dtype=jnp.float32, progress=False)
    got, want = np.asarray(model.apply(v, ids)), np.asarray(merged_model.apply(mv, ids))
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 2e-2 * scale
    half = {p: x[..., : x.shape[-2] // 2, :] if p[-1] == "lora_a" else x[..., : x.shape[-1] // 2]
            for p, x in traverse_util.flatten_dict(v["params"]).items()}  # fmt: skip
    wrong = np.asarray(model.clone(lora=dataclasses.replace(model.lora, rank=16, alpha=model.lora.alpha / 2)).apply(
        {**v, "params": traverse_util.unflatten_dict(half)}, ids))  # fmt: skip
    assert np.abs(wrong - want).max() > 10 * np.abs(got - want).max()
    assert json.loads((export / "adapter_residual" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
