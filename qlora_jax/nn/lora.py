"""``LoRADense``: a frozen (4-bit or bf16) linear layer plus a trainable low-rank adapter.

    y = x W^T + b + s · dropout(x) A^T B^T,   s = alpha / r   (rsLoRA: alpha / sqrt(r))

as PEFT defines LoRA (``peft/tuners/lora/layer.py``). DoRA (``use_dora``, PEFT's
``DoraLinearLayer``) adds a trainable magnitude ``m [out]`` and rescales each output row by
``g = m / ||W + s B A||_row``, the norm over the input dimension detached from the gradient:

    y = x W^T + b + (g - 1) · dropout(x) W^T + g · s · dropout(x) A^T B^T

(with dropout off: ``y = g · (x W^T + s x A^T B^T) + b``); ``m`` starts at ``||W||_row``, so a
fresh DoRA adapter is a no-op too. ``W`` is stored in torch's ``[out, in]``
layout — a :class:`~qlora_jax.quant.QuantizedTensor` (NF4/FP4/int4, ± double quant) or, for the
16-bit LoRA baseline, a plain array — in the non-trainable ``"base"`` collection with the
optional bias. Only ``lora_a [r, in]`` and ``lora_b [out, r]`` live in ``"params"``, so
``jax.grad`` over ``variables["params"]`` reaches the adapters and nothing else:

    variables = model.init(rng, x)                    # {"params": ..., "base": ...}
    params, frozen = split_params(variables)
    y = model.apply(merge_params(params, frozen), x)
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from qlora_jax import kernels, parallel, quant
from qlora_jax.nn.lora_init import is_residual_init

# the name every LoRADense output carries, for remat policies that keep the linears' outputs
# (qlora_jax.nn.llama.REMAT_POLICIES): qmatmul is a custom_vjp, which dots_saveable does not see
LINEAR_OUTPUT = "linear_out"

Array = jax.Array
LORA_LEAVES = ("lora_a", "lora_b", "lora_magnitude")


def module_matches(module: str, patterns: tuple[str, ...]) -> bool:
    """Whether a transformers module name (``model.layers.3.mlp.down_proj``) matches one of
    ``patterns``: a run of whole dotted components, e.g. ``down_proj``, ``layers.3.mlp.down_proj``
    or the full name (a trailing ``.weight`` is ignored)."""
    name = f".{module.removesuffix('.weight')}."
    return any(f".{p.removesuffix('.weight').strip('.')}." in name for p in patterns if p.strip("."))


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How frozen linear weights are stored: bitsandbytes-style 4-bit block quantization.

    ``skip_modules`` keeps the matching linears in 16 bits (bitsandbytes' ``llm_int8_skip_modules``)
    and ``no_double_quant`` stores them without double quantization; both take module names or
    dotted parts of them (:func:`module_matches`). They are the remedies for a tensor the loader
    reports as quantizing far worse than the rest of the model.

    ``weight_dtype`` is what each QuantizedTensor records as its source dtype (what it dequantizes
    to by default, and what bitsandbytes serializes as ``dtype``), whatever dtype the weight being
    quantized came in: the loader sets it to the checkpoint's, so the abstract base the shardings
    are derived from is the one the load makes.
    """

    quant_type: str = "nf4"  # "nf4" | "fp4" | "int4"
    block_size: int = 64
    double_quant: bool = True
    nested_block_size: int = 256
    skip_modules: tuple[str, ...] = ()
    no_double_quant: tuple[str, ...] = ()
    weight_dtype: str = "float32"  # "float32" | "bfloat16" | "float16"

    def __post_init__(self):
        for field in ("skip_modules", "no_double_quant"):  # tuples: the config stays hashable for jit
            value = getattr(self, field)
            object.__setattr__(self, field, (value,) if isinstance(value, str) else tuple(value))
            # a MoE layer's experts share one storage per linear (qlora_jax.nn.moe.ExpertLinear)
            one = [p for p in getattr(self, field) if re.search(r"(^|\.)experts\.\d+(\.|$)", p)]
            if one:
                raise ValueError(
                    f"QuantConfig.{field}: {one} pick single experts; a MoE layer stores all of a linear's experts "
                    "alike: name the linear (layers.1.mlp.experts.gate_proj)"
                )

    def for_module(self, module: str) -> QuantConfig | None:
        """The storage of the linear ``module`` (a transformers name): None = kept in 16 bits."""
        if module_matches(module, self.skip_modules):
            return None
        if self.double_quant and module_matches(module, self.no_double_quant):
            return dataclasses.replace(self, double_quant=False)
        return self

    def quantize(self, w, name: str = "weight") -> quant.QuantizedTensor:
        qt = quant.quantize(w, self.quant_type, self.block_size, self.double_quant, self.nested_block_size, name=name)
        return qt if qt.dtype == self.weight_dtype else qt.replace(dtype=self.weight_dtype)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Adapter hyperparameters (PEFT's LoraConfig names in comments).

    Defaults are the QLoRA paper's: r=64, alpha=16, dropout 0.1, all seven linears of a block.
    """

    rank: int = 64  # r
    alpha: float = 16.0  # lora_alpha
    dropout: float = 0.1  # lora_dropout
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    init: str = "default"  # "default": A ~ U(±1/sqrt(in)); "gaussian": A ~ N(0, 1/r). B = 0 either way.
    dtype: Any = jnp.float32  # adapter parameter dtype (fp32 or bf16)
    use_dora: bool = False  # use_dora: a magnitude per output row (module docstring)
    loftq_iter: int = 1  # LoftQ's alternations (init="loftq"; PEFT's loftq_config["loftq_iter"])

    def __post_init__(self):
        # a tuple, so the config (and the modules holding it) stay hashable for jit
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"LoRAConfig.targets must be module names like 'q_proj'; got {self.targets!r}")
        if self.rank < 0:
            raise ValueError(f"LoRAConfig.rank must be >= 0; got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1); got {self.dropout}")
        if self.init not in ("default", "gaussian") and not is_residual_init(self.init):
            raise ValueError(
                "LoRAConfig.init must be 'default', 'gaussian', 'pissa', 'pissa_niter_<k>', 'olora' or 'loftq'; "
                f"got {self.init!r}"
            )
        if self.loftq_iter < 1:
            raise ValueError(f"LoRAConfig.loftq_iter must be >= 1; got {self.loftq_iter}")
        if jnp.dtype(self.dtype).name not in ("float32", "bfloat16"):
            raise ValueError(f"LoRAConfig.dtype must be float32 or bfloat16; got {self.dtype}")

    @property
    def scale(self) -> float:
        if self.rank == 0:
            return 0.0
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def init_lora_a(key: Array, shape: tuple[int, ...], init: str, dtype) -> Array:
    """``lora_a [..., r, in]`` (leading axes: stacked layers): kaiming_uniform(a=√5) = U(±1/√in)
    (PEFT default), or N(0, 1/r)."""
    *_, r, fan_in = shape
    if init == "gaussian":
        return (jax.random.normal(key, shape, jnp.float32) / math.sqrt(r)).astype(dtype)
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def init_lora_b(shape: tuple[int, ...], dtype) -> Array:
    """``lora_b [..., out, r]``: zeros, so a fresh adapter is an exact no-op."""
    return jnp.zeros(shape, dtype)


def dense_weight(kernel, dtype=jnp.float32) -> Array:
    """A frozen kernel ``[..., out, in]`` (QuantizedTensor or array; leading axes: stacked layers)
    as a dense array in ``dtype``."""
    if not quant.is_quantized(kernel):
        return jnp.asarray(kernel).astype(dtype)
    fn = lambda q: quant.dequantize(q, dtype)  # noqa: E731
    for _ in range(kernel.packed.ndim - 1):
        fn = jax.vmap(fn)
    return fn(kernel)


def dora_norm(w: Array, lora_a: Array | None = None, lora_b: Array | None = None, scale: float = 0.0) -> Array:
    """``||W + s B A||`` over the input dimension, per output row, in float32 (``[..., out]``),
    detached from the gradient as PEFT detaches it (``DoraLinearLayer.get_weight_norm``)."""
    w = jnp.asarray(w, jnp.float32)
    if lora_a is not None:
        w = w + scale * jnp.matmul(lora_b.astype(jnp.float32), lora_a.astype(jnp.float32))
    return jax.lax.stop_gradient(jnp.linalg.norm(w, axis=-1))


class LoRADense(nn.Module):
    """Frozen linear layer (``"base"``: ``kernel`` [out, in], optional ``bias``) + LoRA adapter.

    Attributes:
      features: out_features.
      lora: adapter settings; ``None`` or rank 0 = a plain (quantized) linear layer.
      quant: storage of the frozen kernel when this module initializes it; ``None`` = plain
        array in ``dtype``. A loaded checkpoint decides by what it puts in ``"base"``.
      use_bias: a frozen bias (Qwen2's q/k/v projections).
      dtype: compute dtype (bf16): activations, the dequantized weight, the adapter matmuls.
      impl: the :func:`qlora_jax.kernels.qmatmul` implementation: a :class:`qlora_jax.kernels.Dispatch`
        (a static per-device choice) or an impl name.
    """

    features: int
    lora: LoRAConfig | None = None
    quant: QuantConfig | None = None
    use_bias: bool = False
    dtype: Any = jnp.bfloat16
    impl: Any = "auto"

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        in_features = x.shape[-1]

        def init_kernel():
            w = nn.initializers.normal(0.02)(self.make_rng("params"), (self.features, in_features), jnp.float32)
            module = hf_module_name(self.scope.path)
            storage = self.quant.for_module(module) if self.quant is not None else None
            return storage.quantize(w, module or "kernel") if storage is not None else w.astype(self.dtype)

        kernel = self.variable("base", "kernel", init_kernel).value
        # FSDP: the base is stored split over devices; gather this layer's 4-bit bytes (not a
        # dequantized copy) just before use
        kernel = parallel.gather(kernel)
        x = x.astype(self.dtype)
        if isinstance(kernel, quant.QuantizedTensor):
            if kernel.shape != (self.features, in_features):
                raise ValueError(
                    f"{self.name}: frozen kernel has shape {kernel.shape}; expected {(self.features, in_features)}"
                )
            y = kernels.qmatmul(x, kernel, impl=self.impl)
        else:
            w = jnp.asarray(kernel).astype(self.dtype)  # [out, in]
            y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(
                self.dtype
            )
        bias = None
        if self.use_bias:
            bias = self.variable("base", "bias", lambda: jnp.zeros((self.features,), self.dtype)).value
        cfg = self.lora
        if cfg is None or cfg.rank == 0:
            return checkpoint_name(y if bias is None else y + bias.astype(self.dtype), LINEAR_OUTPUT)
        r = cfg.rank
        a = self.param("lora_a", lambda k: init_lora_a(k, (r, in_features), cfg.init, cfg.dtype))
        b = self.param("lora_b", lambda k: init_lora_b((self.features, r), cfg.dtype))
        dropped = cfg.dropout > 0 and not deterministic
        h = nn.Dropout(cfg.dropout)(x, deterministic=not dropped)  # the adapter's input only
        a, b = parallel.gather((a, b))  # adapters split over fsdp (config.sharding.params) too
        lora_out = _matmul_t(_matmul_t(h, a.astype(self.dtype)), b.astype(self.dtype))  # [..., out]
        if not cfg.use_dora:
            y = y if bias is None else y + bias.astype(self.dtype)
            y = y + (lora_out.astype(jnp.float32) * cfg.scale).astype(self.dtype)
            return checkpoint_name(y, LINEAR_OUTPUT)
        w = dense_weight(kernel)  # float32 [out, in]: the norm needs the whole weight
        # float32 whatever cfg.dtype: m ~ ||W_row|| changes by ~lr a step, below a bf16 ulp of it
        m = self.param("lora_magnitude", lambda _: dora_norm(w))
        g = parallel.gather(m).astype(jnp.float32) / dora_norm(w, a, b, cfg.scale)  # [out]
        base, delta = y.astype(jnp.float32), cfg.scale * lora_out.astype(jnp.float32)
        if dropped:  # as PEFT: the rescaling of the base acts on the dropped-out input
            base_d = _matmul_t(h, w.astype(self.dtype)).astype(jnp.float32)
            out = base + (g - 1) * base_d + g * delta
        else:
            out = g * (base + delta)
        y = (out if bias is None else out + bias.astype(jnp.float32)).astype(self.dtype)
        return checkpoint_name(y, LINEAR_OUTPUT)


def hf_module_name(path: tuple[str, ...]) -> str:
    """Our module path ``("layers_3", "mlp", "down_proj")`` -> transformers' ``model.layers.3.mlp.down_proj``.

    The one HF name the layer itself needs (:class:`LoRADense` matches it against
    ``QuantConfig.skip_modules``); the checkpoint name maps are in :mod:`qlora_jax.checkpoints`
    (``hf.hf_tensor_name``, ``hf.config_to_hf``, ``peft.peft_tensor_name``, ``gguf.gguf_tensor_name``).
    """
    if not path:  # a module applied on its own
        return ""
    head, *rest = path
    if head.startswith("layers_"):
        head = f"layers.{head.removeprefix('layers_')}"
    return ".".join(["model", head, *rest]) if head != "lm_head" else head


def _matmul_t(x: Array, w: Array) -> Array:
    """``x @ w.T`` with float32 accumulation, result in x's dtype."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(
        x.dtype
    )


# --- trainable / frozen bookkeeping --------------------------------------------------------------


class Variables(NamedTuple):
    """A model's variables split by role (:func:`split_params`).

    ``params`` is the ``"params"`` collection: what trains under LoRA (the adapters). ``base`` is
    the ``"base"`` collection's tree: the checkpoint's weights (the 4-bit linears, embeddings,
    norms), frozen under LoRA and trained under ``train.trainable='full'``.
    """

    params: dict
    base: dict


def split_params(variables: dict) -> Variables:
    """``{"params": p, "base": b}`` -> ``Variables(params=p, base=b)``.

    Example::

        params, base = split_params(model.init(rng, x))
        grads = jax.grad(lambda p: loss(model.apply(merge_params(p, base), x)))(params)

    ``params`` holds only ``lora_a``/``lora_b`` leaves (:func:`check_trainable` verifies it).
    A variables dict holding other collections (a ``"cache"``) is refused: split a model's
    variables, not a decoding state.
    """
    other = sorted(set(variables) - {"params", "base"})
    if other:
        raise ValueError(f"split_params: variables hold collections {other} besides 'params' and 'base'")
    return Variables(variables.get("params", {}), variables.get("base", {}))


def merge_params(params: dict, base: dict, trains: str = "params") -> dict:
    """Inverse of :func:`split_params`: the variables dict for ``model.apply``.

    ``trains="base"`` (full-parameter training) means ``params`` *is* the base tree: the
    variables are then ``{"base": params}`` and ``base`` is ignored.
    """
    if trains == "base":
        return {"base": params}
    return {"params": params, "base": base}


def check_trainable(params: dict) -> None:
    """Raise ``ValueError`` naming any trainable leaf that is not a LoRA adapter weight."""
    bad = [
        jax.tree_util.keystr(path)
        for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
        if not (path and getattr(path[-1], "key", None) in LORA_LEAVES)
    ]
    if bad:
        raise ValueError(f"trainable tree holds non-adapter leaves: {bad[:10]}")


def float32_merge(kernel, lora_a: Array, lora_b: Array, scale: float, magnitude: Array | None = None) -> Array:
    """``dequant(W) + s B A`` in float32 ``[out, in]``: the adapted weight exactly; with a DoRA
    ``magnitude``, each row rescaled to it (``m / ||W + s B A||_row``)."""
    merged = dense_weight(kernel) + scale * jnp.matmul(lora_b.astype(jnp.float32), lora_a.astype(jnp.float32))
    if magnitude is None:
        return merged
    return merged * (magnitude.astype(jnp.float32) / jnp.linalg.norm(merged, axis=-1))[:, None]


def merged_weight(
    kernel,
    lora_a: Array,
    lora_b: Array,
    scale: float,
    *,
    requantize: QuantConfig | None = None,
    magnitude: Array | None = None,
) -> Array | tuple[quant.QuantizedTensor, dict]:
    """``dequant(W) + scale · B @ A`` in bf16 ``[out, in]`` — the adapter folded into the base;
    with a DoRA ``magnitude`` ``[out]``, that times ``m / ||W + s B A||_row``.

    With ``requantize`` the merged weight is quantized again (lossy, as PEFT warns) and returned
    with its error: ``(qt, {"max_abs_err", "rel_fro_err"})`` measured against the bf16 merge.
    """
    merged = float32_merge(kernel, lora_a, lora_b, scale, magnitude).astype(jnp.bfloat16)
    if requantize is None:
        return merged
    qt = requantize.quantize(merged, "merged_weight")
    err = quant.dequantize(qt, jnp.float32) - merged.astype(jnp.float32)
    m32 = merged.astype(jnp.float32)
    stats = {
        "max_abs_err": float(jnp.max(jnp.abs(err))),
        "rel_fro_err": float(jnp.linalg.norm(err) / jnp.maximum(jnp.linalg.norm(m32), np.finfo(np.float32).tiny)),
    }
    return qt, stats
