"""Adapter initialisations that change the base: PiSSA, OLoRA and LoftQ (``LoRAConfig.init``).

Each takes a target linear's full-precision weight ``W [out, in]`` and returns the base to store
and the adapters ``A [r, in]``, ``B [out, r]`` such that ``base + s · B A`` starts at (about) ``W``:

* ``"pissa"`` (PEFT's ``pissa_init``): ``W = U S V^T``; ``A = sqrt(S_r / s) V_r^T``,
  ``B = U_r sqrt(S_r / s)``; the base is the residual ``W - s B A`` (its other singular values),
  quantized where the base is 4-bit. ``"pissa_niter_<k>"``: the top-r part from a randomized SVD
  with ``k`` subspace iterations (Halko et al.'s range finder, as ``torch.svd_lowrank``; its random
  draws are JAX's, so its adapters are not torch's).
* ``"olora"`` (PEFT's ``olora_init``): ``W = Q R``; ``A = R[:r]``, ``B = Q[:, :r]``, base ``W - s B A``.
* ``"loftq"`` (LoftQ, ``loftq_iter`` alternations): ``Q_t = quant(W - s B_{t-1} A_{t-1})`` (B A = 0
  first), then ``B_t, A_t`` the rank-r SVD of ``(W - dequant(Q_t)) / s``, split ``sqrt(S)`` each way;
  the base is ``Q_T``. Unlike PEFT 0.21's ``loftq_init``, which ignores ``s`` (its adapters reproduce
  ``W`` only when ``alpha = r``), the factors here are divided by ``s`` so that
  ``dequant(Q) + s B A`` approximates ``W`` whatever alpha is.

All is computed in float32 (PEFT too). A fresh adapter of these kinds is not a no-op on the stored
base: the model starts at ``base + s B A`` ≈ ``W``. :func:`residual_init` picks the one
``LoRAConfig.init`` names; :func:`reconstruction_error` measures ``||W - (base + s B A)||``.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from qlora_jax import quant

Array = jax.Array
RESIDUAL_INITS = ("pissa", "olora", "loftq")  # and "pissa_niter_<k>"
_NITER = re.compile(r"pissa_niter_(\d+)")


def is_residual_init(init: str) -> bool:
    """Whether ``LoRAConfig.init`` replaces the base (PiSSA, OLoRA, LoftQ)."""
    return init in RESIDUAL_INITS or _NITER.fullmatch(init) is not None


def _split(u: Array, s: Array, vt: Array, r: int, scale: float) -> tuple[Array, Array]:
    root = jnp.sqrt(s[:r] / scale)
    return root[:, None] * vt[:r], u[:, :r] * root[None, :]  # A [r, in], B [out, r]


def randomized_svd(w: Array, r: int, niter: int, key: Array) -> tuple[Array, Array, Array]:
    """Top-``r`` ``(U, S, V^T)`` of ``w`` by a Gaussian range finder with ``niter`` subspace
    iterations (each re-orthonormalized by QR), then the exact SVD of the ``r x in`` projection."""
    g = jax.random.normal(key, (w.shape[1], r), jnp.float32)
    q, _ = jnp.linalg.qr(w @ g)
    for _ in range(niter):
        z, _ = jnp.linalg.qr(w.T @ q)
        q, _ = jnp.linalg.qr(w @ z)
    ub, s, vt = jnp.linalg.svd(q.T @ w, full_matrices=False)
    return q @ ub, s, vt


def pissa(w: Array, r: int, scale: float, niter: int | None = None, key: Array | None = None):
    """``(residual W - s B A, A, B)``, float32; ``niter``: the randomized SVD (``key`` its draws)."""
    w = jnp.asarray(w, jnp.float32)
    if niter is None:
        u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    else:
        u, s, vt = randomized_svd(w, r, niter, key if key is not None else jax.random.key(0))
    a, b = _split(u, s, vt, r, scale)
    return w - scale * (b @ a), a, b


def olora(w: Array, r: int, scale: float):
    """``(residual W - s B A, A = R[:r], B = Q[:, :r])`` of ``W = Q R``, float32."""
    w = jnp.asarray(w, jnp.float32)
    q, rr = jnp.linalg.qr(w)
    a, b = rr[:r], q[:, :r]
    return w - scale * (b @ a), a, b


def loftq(w: Array, r: int, scale: float, storage, iters: int = 1):
    """``(W', A, B)`` after ``iters`` alternations (module docstring): ``storage.quantize(W')`` is
    the base ``Q_T`` (quantization is deterministic); ``storage`` a :class:`qlora_jax.nn.lora.QuantConfig`."""
    if iters < 1:
        raise ValueError(f"LoRAConfig.loftq_iter must be >= 1; got {iters}")
    w = jnp.asarray(w, jnp.float32)
    target, a, b = w, None, None
    for _ in range(iters):
        target = w if a is None else w - scale * (b @ a)
        qt = storage.quantize(target, "loftq")
        u, s, vt = jnp.linalg.svd(w - quant.dequantize(qt, jnp.float32), full_matrices=False)
        a, b = _split(u, s, vt, r, scale)
    return target, a, b


def residual_init(w: Array, lora, storage, key: Array, name: str = "weight"):
    """``(base, A, B)`` for ``lora.init`` (a residual init), float32: the base to store, to be
    quantized with ``storage`` (a QuantConfig) for a 4-bit base (LoftQ's: the weight whose
    quantization is ``Q_T``). ``name``: the tensor, for errors."""
    r, s, init = lora.rank, lora.scale, lora.init
    if r > min(w.shape):
        raise ValueError(f"{name}: LoRAConfig.init={init!r} needs rank <= min{tuple(w.shape)}; got r={r}")
    if init == "loftq":
        if storage is None:
            raise ValueError(f"{name}: LoRAConfig.init='loftq' initializes against a quantized base; this one is not")
        return loftq(w, r, s, storage, lora.loftq_iter)
    m = _NITER.fullmatch(init)
    if init == "pissa" or m:
        return pissa(w, r, s, int(m.group(1)) if m else None, key)
    if init == "olora":
        return olora(w, r, s)
    raise ValueError(f"{name}: LoRAConfig.init={init!r} is not a residual init ({RESIDUAL_INITS}, pissa_niter_<k>)")


def reconstruction_error(w: Array, base, a: Array, b: Array, scale: float) -> float:
    """``||W - (base + s B A)||_F / ||W||_F`` (the base dequantized if 4-bit), float32."""
    w = jnp.asarray(w, jnp.float32)
    dense = quant.dequantize(base, jnp.float32) if quant.is_quantized(base) else jnp.asarray(base, jnp.float32)
    err = w - (dense + scale * (b.astype(jnp.float32) @ a.astype(jnp.float32)))
    return float(jnp.linalg.norm(err) / jnp.linalg.norm(w))


def convert_to_lora(params: dict, initial: dict) -> dict:
    """A PiSSA / OLoRA / LoftQ adapter trained from ``initial`` as a plain LoRA delta on the original
    base, PEFT's conversion (``subtract_mutated_init``): ``s B A - s B0 A0 = s [B | -B0] [A ; A0]``,
    rank 2r: use with ``r * 2`` and ``alpha * 2`` (rsLoRA: ``alpha * sqrt(2)``), which keep ``s``.
    ``params`` and ``initial``: adapter trees of one layout; other leaves (DoRA) are refused."""
    from flax import traverse_util

    flat, flat0 = traverse_util.flatten_dict(params), traverse_util.flatten_dict(initial)
    if flat.keys() != flat0.keys():
        raise ValueError("params and initial adapters differ in structure")
    out = {}
    for path, x in flat.items():
        if path[-1] == "lora_a":
            out[path] = jnp.concatenate([x, flat0[path].astype(x.dtype)], axis=-2)
        elif path[-1] == "lora_b":
            out[path] = jnp.concatenate([x, -flat0[path].astype(x.dtype)], axis=-1)
        else:
            raise ValueError(f"{'.'.join(path)}: only LoRA A and B convert (not DoRA's magnitude)")
    return traverse_util.unflatten_dict(out)
