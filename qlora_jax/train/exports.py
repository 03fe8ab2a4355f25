"""The export step at the end of a run: PEFT adapters (and the base of a random-init run), or the
trained model itself (``train.trainable='full'``), plus the merged, 4-bit and GGUF checkpoints
``config.export`` asks for. The formats are :mod:`qlora_jax.checkpoints`'."""

from __future__ import annotations

import jax.numpy as jnp

from qlora_jax.checkpoints import export_gguf, export_hf, export_peft_adapter, export_quantized
from qlora_jax.data import ByteTokenizer


def _save_tokenizer(tok, path) -> None:
    """A checkpoint we write carries our byte tokenizer, so it works as ``config.model_path``."""
    if isinstance(tok, ByteTokenizer):
        tok.save(path)


def write_exports(config, out, model_cfg, tok, params_host, base, lora, quant, initial=None) -> None:
    """Write the run's exports under ``out`` (process 0 calls it) from host copies of the trained
    ``params_host`` and, when an export needs it, of the ``base``; ``lora`` / ``quant`` are the
    run's LoRAConfig and QuantConfig (None: 16-bit).

    ``initial``: a residual init's adapters at step 0 (PiSSA, OLoRA, LoftQ). ``adapter`` is then
    PEFT's conversion to a plain LoRA on ``model_path``'s own weights (rank 2r), and
    ``adapter_residual`` the trained adapter itself, for the residual base (``merged`` and
    ``quantized`` are built on it)."""
    full = config.train.trainable == "full"
    if full:  # the trained model itself: usable as another run's config.model_path
        export_hf(out / "model", model_cfg, params_host)
        _save_tokenizer(tok, out / "model")
    elif initial is not None:
        export_peft_adapter(out / "adapter", params_host, lora, config.model_path, initial=initial)
        residual_base = str(out / "quantized") if config.export.quantized and quant is not None else None
        export_peft_adapter(out / "adapter_residual", params_host, lora, residual_base)
    else:
        export_peft_adapter(out / "adapter", params_host, lora, config.model_path or str(out / "base"))
        if not config.model_path:
            export_hf(out / "base", model_cfg, base)
            _save_tokenizer(tok, out / "base")
    if config.export.merged and not full:
        export_hf(out / "merged", model_cfg, base, dtype=jnp.bfloat16, params=params_host, lora=lora)
        _save_tokenizer(tok, out / "merged")
    if config.export.gguf:  # the merged model (or the trained one) for llama.cpp / Ollama
        weights = dict(params=None, lora=None) if full else dict(params=params_host, lora=lora)
        export_gguf(out / "model.gguf", model_cfg, params_host if full else base, tok, config.export.gguf, **weights)
    if config.export.quantized and quant is not None:
        export_quantized(out / "quantized", model_cfg, base, quant)
        _save_tokenizer(tok, out / "quantized")
