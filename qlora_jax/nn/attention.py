"""Attention whose memory grows with the sequence, not its square: keys in chunks, online softmax.

:func:`chunked_attention` is FlashAttention's algorithm in plain JAX (``lax.scan`` over key
chunks; Dao et al. 2022, Rabe & Staats 2021): the forward pass keeps a running maximum, sum and
weighted value sum per query, so no ``[S, T]`` score matrix is ever whole, and its custom VJP
saves only the output and each query's log-sum-exp, recomputing each chunk's probabilities in the
backward pass. Activation memory is ``O(S · chunk)`` per head instead of ``O(S²)``, on any
backend. It takes what the decoder's masks need: causal by position, padding, packed segments,
a sliding window that a traced per-layer flag switches (alternating layers under ``nn.scan``),
Gemma 2's score soft-capping and grouped-query heads.

:func:`reference_attention` materialises the scores: the decode path (a few queries against the
cache) and the tests' reference. :func:`dot_product_attention` hands the same masked attention to
``jax.nn.dot_product_attention``: cuDNN's fused flash attention on a GPU where cuDNN takes the
call, XLA's whole-matrix attention otherwise (the CPU); no soft-capping.

Shapes: ``q [B, S, Hkv, G, D]`` (``G`` query heads per key/value head), ``k``, ``v``
``[B, T, Hkv, D]``; positions, masks and segments ``[B, S]`` / ``[B, T]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array
_NEG = float(jnp.finfo(jnp.float32).min)  # finite: a fully masked (padding) query row stays finite


def allowed_keys(q_pos, k_pos, key_mask, q_seg, k_seg, sliding, window) -> Array:
    """``[B, S, T]`` bool: causal by position, real keys, the same packed example, and within
    ``window`` on a ``sliding`` layer (``q_seg`` None: no packing; ``window`` None: no window)."""
    allowed = (k_pos[:, None, :] <= q_pos[:, :, None]) & key_mask[:, None, :]
    if q_seg is not None:
        allowed &= k_seg[:, None, :] == q_seg[:, :, None]
    if window is not None:
        allowed &= ~jnp.asarray(sliding) | (q_pos[:, :, None] - k_pos[:, None, :] < window)
    return allowed


def _scores(q, k, scale, cap):
    """Raw ``[B, Hkv, G, S, T]`` float32 scores, scaled and soft-capped."""
    s = jnp.einsum("bsngd,btnd->bngst", q, k, preferred_element_type=jnp.float32) * scale
    return s if cap is None else jnp.tanh(s / cap) * cap


def reference_attention(q, k, v, allowed, *, scale: float, cap: float | None = None) -> Array:
    """Softmax attention over the whole ``[S, T]`` score matrix; ``allowed [B, S, T]``. float32
    ``[B, S, Hkv, G, D]``."""
    s = jnp.where(allowed[:, None, None], _scores(q, k, scale, cap), _NEG)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bngst,btnd->bsngd", p, v, preferred_element_type=jnp.float32)


def dot_product_attention(q, k, v, allowed, *, scale: float, implementation: str | None = None) -> Array:
    """:func:`reference_attention` (no soft-cap) by ``jax.nn.dot_product_attention``: the mask
    ``allowed [B, S, T]`` as its boolean ``mask``, the ``G`` query heads of each key/value head
    adjacent as it groups them. ``implementation``: None (cuDNN where it takes the call, else
    XLA), ``"xla"`` or ``"cudnn"``. float32 ``[B, S, Hkv, G, D]``.

    A query with no key to attend to (a padding row) averages every value with equal weights, as
    the reference's finite mask value makes it do (its query zeroed: equal scores), rather than
    leaving the fused kernel a row with no key."""
    b, s, n, g, d = q.shape
    empty = ~allowed.any(-1)  # [B, S]
    q = jnp.where(empty[:, :, None, None, None], jnp.zeros((), q.dtype), q)
    allowed = allowed | empty[:, :, None]
    out = jax.nn.dot_product_attention(
        q.reshape(b, s, n * g, d), k, v.astype(q.dtype), mask=allowed[:, None], scale=scale,
        implementation=implementation,
    )  # fmt: skip
    return out.reshape(b, s, n, g, d).astype(jnp.float32)


def chunked_attention(
    q, k, v, q_pos, k_pos, key_mask, q_seg=None, k_seg=None, sliding=False, *,
    window: int | None = None, scale: float, cap: float | None = None, chunk: int = 512,
) -> Array:  # fmt: skip
    """:func:`reference_attention` of :func:`allowed_keys`'s mask, keys ``chunk`` at a time (the
    key axis is padded to a multiple of it with masked keys). float32 ``[B, S, Hkv, G, D]``."""
    t = k.shape[1]
    chunk = min(chunk, t)
    pad = -t % chunk
    if pad:
        widths = [(0, 0), (0, pad)]
        k = jnp.pad(k, widths + [(0, 0)] * 2)
        v = jnp.pad(v, widths + [(0, 0)] * 2)
        k_pos, key_mask = jnp.pad(k_pos, widths), jnp.pad(key_mask, widths)
        k_seg = None if k_seg is None else jnp.pad(k_seg, widths)
    if q_seg is None:  # one code path: every key in the query's segment
        q_seg, k_seg = jnp.zeros(q_pos.shape, jnp.int32), jnp.zeros(k_pos.shape, jnp.int32)
    masks = (q_pos, k_pos, key_mask, q_seg, k_seg, jnp.asarray(sliding, jnp.bool_))
    out, _ = _flash(q, k, v, masks, window, float(scale), cap, chunk)
    return out


def _split(x, chunk):
    """``[B, T, ...]`` -> ``[T / chunk, B, chunk, ...]`` (the scan axis first)."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 1, 0)


def _chunk_mask(masks, kc, window):
    q_pos, _, _, q_seg, _, sliding = masks
    k_pos, key_mask, k_seg = kc
    return allowed_keys(q_pos, k_pos, key_mask, q_seg, k_seg, sliding, window)[:, None, None]  # [B, 1, 1, S, C]


def _forward(q, k, v, masks, window, scale, cap, chunk):
    _, k_pos, key_mask, _, k_seg, _ = masks
    b, s, n, g, d = q.shape
    xs = (_split(k, chunk), _split(v, chunk), (_split(k_pos, chunk), _split(key_mask, chunk), _split(k_seg, chunk)))

    def step(carry, x):
        m, l, acc = carry  # running max, sum of exp, weighted values: [B, Hkv, G, S(, D)]
        kc, vc, kmask = x
        sc = jnp.where(_chunk_mask(masks, kmask, window), _scores(q, kc, scale, cap), _NEG)
        m_new = jnp.maximum(m, sc.max(-1))
        p = jnp.exp(sc - m_new[..., None])
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(-1)
        pv = jnp.einsum("bngst,btnd->bngsd", p.astype(v.dtype), vc, preferred_element_type=jnp.float32)
        return (m_new, l, acc * correction[..., None] + pv), None

    init = (
        jnp.full((b, n, g, s), _NEG, jnp.float32),
        jnp.zeros((b, n, g, s), jnp.float32),
        jnp.zeros((b, n, g, s, d), jnp.float32),
    )
    # checkpointed: differentiated inside an outer scan (the layers under nn.scan), JAX's partial
    # evaluation otherwise keeps every chunk's mask as a residual, [T / chunk, B, H, S, chunk] in all:
    # quadratic again (measured, 1-layer model at S = 8192: 488 MB of temporaries, 320 MB with this)
    (m, l, acc), _ = jax.lax.scan(jax.checkpoint(step, prevent_cse=False), init, xs)
    out = acc / l[..., None]  # l >= 1: the running max's own term
    lse = m + jnp.log(l)
    return jnp.moveaxis(out, 3, 1), lse  # [B, S, Hkv, G, D], [B, Hkv, G, S]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, masks, window, scale, cap, chunk):
    return _forward(q, k, v, masks, window, scale, cap, chunk)


def _flash_fwd(q, k, v, masks, window, scale, cap, chunk):
    out, lse = _forward(q, k, v, masks, window, scale, cap, chunk)
    return (out, lse), (q, k, v, masks, out, lse)


def _flash_bwd(window, scale, cap, chunk, res, cotangents):
    q, k, v, masks, out, lse = res
    d_out = jnp.moveaxis(cotangents[0].astype(jnp.float32), 1, 3)  # [B, Hkv, G, S, D]; lse's is unused
    delta = jnp.sum(d_out * jnp.moveaxis(out, 1, 3), axis=-1)  # [B, Hkv, G, S]
    _, k_pos, key_mask, _, k_seg, _ = masks
    xs = (_split(k, chunk), _split(v, chunk), (_split(k_pos, chunk), _split(key_mask, chunk), _split(k_seg, chunk)))

    def step(dq, x):
        kc, vc, kmask = x
        allowed = _chunk_mask(masks, kmask, window)
        raw = jnp.einsum("bsngd,btnd->bngst", q, kc, preferred_element_type=jnp.float32) * scale
        capped = raw if cap is None else jnp.tanh(raw / cap) * cap
        p = jnp.exp(jnp.where(allowed, capped, _NEG) - lse[..., None])
        dv = jnp.einsum("bngst,bngsd->btnd", p.astype(v.dtype), d_out.astype(v.dtype),
                        preferred_element_type=jnp.float32)  # fmt: skip
        dp = jnp.einsum("bngsd,btnd->bngst", d_out, vc.astype(jnp.float32))
        ds = jnp.where(allowed, p * (dp - delta[..., None]), 0.0)
        if cap is not None:
            ds = ds * (1.0 - jnp.square(capped / cap))  # d(cap * tanh(x / cap)) / dx
        ds = ds * scale
        dq = dq + jnp.einsum("bngst,btnd->bsngd", ds, kc.astype(jnp.float32))
        dk = jnp.einsum("bngst,bsngd->btnd", ds, q.astype(jnp.float32))
        return dq, (dk, dv)

    # checkpointed as the forward's step, for the same reason
    dq, (dk, dv) = jax.lax.scan(jax.checkpoint(step, prevent_cse=False), jnp.zeros(q.shape, jnp.float32), xs)

    def join(x, like):  # [T / chunk, B, chunk, ...] -> [B, T, ...]
        x = jnp.moveaxis(x, 0, 1)
        return x.reshape(like.shape).astype(like.dtype)

    masks_ct = jax.tree.map(lambda _: None, masks)
    return dq.astype(q.dtype), join(dk, k), join(dv, v), masks_ct


_flash.defvjp(_flash_fwd, _flash_bwd)
