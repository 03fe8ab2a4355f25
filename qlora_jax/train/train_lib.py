"""``train_and_evaluate(config, workdir)``: the QLoRA fine-tuning loop behind experiments.finetune.

One run: build or load the model (NF4 base + LoRA adapters), build the data, train with a jitted
step over the adapters only (paged AdamW by default; ``train.trainable='full'`` trains every
weight of an unquantized base instead, ``train.steps=0`` only evaluates), log metrics to ``workdir/metrics.jsonl``
and TensorBoard event files (``workdir/tensorboard``), evaluate every ``eval_every`` steps,
checkpoint with orbax every ``checkpoint_every`` steps (adapters, optimizer state, step, data
position; the RNG is a function of the step), and export
PEFT adapters (plus the base, and optionally merged / 4-bit checkpoints) at the end. Re-running
the same command resumes from the latest intact checkpoint and continues exactly as an
uninterrupted run would (same metrics, bit for bit, on CPU). The config is checked once at the
start (:mod:`qlora_jax.train.validate`); the workdir's lock, the resume's config check and the
verified checkpoints are :mod:`qlora_jax.train.workdir`'s.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from qlora_jax import kernels, optim, parallel
from qlora_jax.checkpoints import (
    gguf,
    load_peft_adapter,
    load_pretrained,
    pretrained_model,
)
from qlora_jax.checkpoints.peft import read_peft_config
from qlora_jax.data import (
    Batches,
    ByteTokenizer,
    GenerationItem,
    PackedBatches,
    as_conversations,
    exact_match,
    generation_items,
    load_jsonl,
    load_tokenizer,
    make_examples,
    stop_ids,
    tokenize,
)
from qlora_jax.nn import LlamaConfig, LlamaForCausalLM, LoRAConfig, QuantConfig, generate, merge_params, split_params
from qlora_jax.nn.lora_init import is_residual_init
from qlora_jax.optim import Optimizer, OptimizerConfig
from qlora_jax.train.exports import write_exports
from qlora_jax.train.metrics import MetricsWriter
from qlora_jax.train.state import StateLayout, TrainTree, abstract_variables, quantized_leaves, state_layout
from qlora_jax.train.steps import TrainState, make_eval_step, make_train_step, target_mask
from qlora_jax.train.validate import ConfigError, validate_config
from qlora_jax.train.workdir import (
    Checkpoints,
    RunConflict,
    WorkdirLock,
    check_resume,
    save_run_config,
    write_failed,
)


def _quant_config(config) -> QuantConfig | None:
    q = config.quant
    if not q.enabled:
        return None
    return QuantConfig(
        q.type, q.block_size, q.double_quant, q.nested_block_size, tuple(q.skip_modules), tuple(q.no_double_quant)
    )


def _lora_config(config) -> LoRAConfig:
    c = config.lora
    return LoRAConfig(
        rank=c.rank, alpha=c.alpha, dropout=c.dropout, targets=tuple(c.targets), use_rslora=c.use_rslora,
        init=c.init, dtype=jnp.dtype(c.dtype), use_dora=c.use_dora, loftq_iter=c.loftq_iter,
    )  # fmt: skip


INITIAL_ADAPTER = "initial_adapter.safetensors"  # a residual init's adapters at step 0 (PiSSA, OLoRA, LoftQ)

# the adapter's own settings that config.init_adapter brings into config.lora (dropout, init and the
# parameter dtype stay the run's: they are how it trains, not what the adapter is)
_ADAPTER_KEYS = {"rank": "rank", "alpha": "alpha", "targets": "targets", "use_rslora": "use_rslora",
                 "use_dora": "use_dora"}  # fmt: skip


def with_init_adapter(config):
    """``config`` with ``config.lora``'s rank, alpha, targets, rsLoRA and DoRA those of the PEFT
    adapter ``config.init_adapter`` (a copy; logged where they change). Without one, ``config``."""
    if not config.init_adapter:
        return config
    try:
        lora, _ = read_peft_config(config.init_adapter)
    except ValueError as e:
        raise ConfigError("init_adapter", f"={config.init_adapter!r}: {e}") from None
    config = copy.deepcopy(config)
    for key, field in _ADAPTER_KEYS.items():
        value, old = getattr(lora, field), config.lora[key]
        if (list(old) if isinstance(old, tuple | list) else old) != (
            list(value) if isinstance(value, tuple) else value
        ):
            logging.info("config.lora.%s=%r from the adapter %s (was %r)", key, value, config.init_adapter,
                         config.lora[key])  # fmt: skip
        with config.ignore_type():
            config.lora[key] = value
    return config


def build_model(config):
    """``(model, tokenizer)`` of the run: the checkpoint's architecture (``model_path``) or
    ``config.model``'s; nothing is loaded or initialized yet (:func:`setup` does, into the shards).

    The kernels are a static choice made here, once, for this process's devices
    (:func:`qlora_jax.kernels.for_device`), and passed down to every layer.
    """
    dtype = jnp.dtype(config.train.dtype)
    lora, quant = _lora_config(config), _quant_config(config)
    kw = dict(remat=config.train.remat, impl=kernels.for_device(jax.local_devices()[0]))
    how = dict(remat_policy=config.train.remat_policy, attention=config.train.attention,
               attention_chunk=config.train.attention_chunk, moe_dispatch=config.train.moe_dispatch)  # fmt: skip
    if config.model_path:
        model = pretrained_model(
            config.model_path, quant=quant, lora=lora, dtype=dtype, scan_layers=config.model.scan_layers, **kw
        )
        return model.clone(**how), load_tokenizer(config.model_path)
    tok = ByteTokenizer()
    m = config.model
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads, max_position_embeddings=m.max_position_embeddings,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg, lora=lora, quant=quant, dtype=dtype, scan_layers=config.model.scan_layers, **kw,
                             **how)  # fmt: skip
    return model, tok


def _variables(config, model, layout: StateLayout, shardings: TrainTree) -> dict:
    """The model's variables, the base already in its shardings (loaded straight into them)."""
    trained_base = layout.trainable == "full"
    if config.model_path:
        _, variables = load_pretrained(
            config.model_path, quant=model.quant, lora=model.lora, dtype=model.dtype, seed=config.seed,
            remat=model.remat, impl=model.impl, scan_layers=model.scan_layers, check_finite=config.check_finite,
            progress=config.progress, sharding=shardings.params if trained_base else shardings.base,
        )  # fmt: skip
        return _with_adapter(config, model, variables)
    # a random base is a toy: initialized on the host, then split. Eager on purpose: jax.jit(model.init)
    # takes 2.1 s instead of 5.5 s here, but XLA compiles the random normal init differently (ulps in
    # ~27 % of the weights), so every run and notebook result measured from this seed would change
    return _with_adapter(config, model, model.init(jax.random.key(config.seed), jnp.ones((1, 8), jnp.int32)))


def _with_adapter(config, model, variables: dict) -> dict:
    """The variables with ``config.init_adapter``'s adapters as their params (none: as they are)."""
    if not config.init_adapter:
        return variables
    adapted, variables = load_peft_adapter(model, variables, config.init_adapter, dtype=model.lora.dtype)
    if dataclasses.replace(adapted.lora, dropout=model.lora.dropout, init=model.lora.init) != model.lora:
        raise ConfigError("init_adapter", f"={config.init_adapter!r}: its LoRA settings {adapted.lora} differ from "
                                          f"config.lora's {model.lora} (use with_init_adapter)")  # fmt: skip
    return variables


@dataclasses.dataclass
class Data:
    """The batches of a run and its held-out generation set (:func:`build_data`)."""

    train: Batches
    eval: Batches
    generation: list[GenerationItem]
    stop_ids: tuple[int, ...]


def _chat_template(config, tok) -> str | None:
    """``data.chat_template`` resolved (None: the tokenizer's own, or the default)."""
    if not config.data.chat_template:
        return None
    try:
        return tok.template(config.data.chat_template)
    except ValueError as e:
        raise ValueError(f"config.data.chat_template: {e}") from None


def build_data(config, tok) -> Data:
    d = config.data
    template = _chat_template(config, tok)
    if d.kind == "synthetic":
        train_ex = make_examples(d.num_train, config.seed, tuple(d.families))
        eval_ex = make_examples(d.num_eval, config.seed + 1, tuple(d.families))
        if template or tok.chat_template:  # an instruct model: its own template, as a user would prompt it
            train_ex, eval_ex = as_conversations(train_ex), as_conversations(eval_ex)
    else:  # "jsonl": Alpaca records become conversations for a model that has a chat template
        as_chat = bool(template or tok.chat_template)
        ds = load_jsonl(d.path, d.format, skip_malformed=d.skip_malformed, as_chat=as_chat)
        if ds.skipped:
            logging.warning("%s: skipped %d malformed lines", d.path, ds.skipped)
        examples = ds.examples
        n_eval = min(d.num_eval, len(examples) // 10)
        order = np.random.default_rng(config.seed).permutation(len(examples))
        eval_ex = [examples[i] for i in order[:n_eval]]
        train_ex = [examples[i] for i in order[n_eval:]]
    kw = dict(
        source_max_len=d.source_max_len, target_max_len=d.target_max_len, skip_empty=d.skip_malformed,
        train_on=d.train_on, chat_template=template,
    )  # fmt: skip
    train, train_report = tokenize(train_ex, tok, train_on_source=d.train_on_source, **kw)
    evals, eval_report = tokenize(eval_ex, tok, **kw)
    for split, report in (("train split", train_report), ("eval split", eval_report)):
        for message in report.warnings(split, d.source_max_len, d.target_max_len):
            logging.warning("%s", message)
    if d.kind == "jsonl":
        made = {"train": f"{d.path} less the eval split", "eval": f"10% of {d.path}, at most config.data.num_eval"}
    else:
        made = {"train": f"config.data.num_train={d.num_train}", "eval": f"config.data.num_eval={d.num_eval}"}
    for split, data in (("train", train), ("eval", evals)):
        if len(data) < config.train.batch_size:
            raise ValueError(
                f"{split} split: {len(data)} examples cannot fill a batch of config.train.batch_size="
                f"{config.train.batch_size} (the split is {made[split]}): give it more examples or lower the batch size"
            )
    length = d.source_max_len + d.target_max_len
    bs = config.train.batch_size
    if d.packing:
        batches = PackedBatches(train, bs, tok.pad_id, seed=config.seed, length=length)
        logging.info("packing: %.1f%% of the train rows' tokens are padding", 100 * batches.padding_fraction())
    else:
        batches = Batches(train, bs, tok.pad_id, seed=config.seed, group_by_length=d.group_by_length, pad_to=length)
    eval_batches = Batches(evals, bs, tok.pad_id, seed=0, group_by_length=False, pad_to=length)
    raw_text = d.kind == "jsonl" and d.format == "text"
    generation = generation_items(
        eval_ex[: config.num_generate], tok, max_prompt=d.source_max_len, raw_text=raw_text, chat_template=template
    )
    return Data(batches, eval_batches, generation, stop_ids(tok, template))


def build_optimizer(config) -> Optimizer:
    """The optimizer of ``config.train`` (:func:`qlora_jax.optim.build_optimizer`, the one builder)."""
    return optim.build_optimizer(OptimizerConfig.from_config(config.train))


def _evaluate(eval_step, params, frozen, eval_batches, sharding, config):
    eval_batches.restore({"epoch": 0, "index": 0})
    total, count = 0.0, 0
    for _ in range(config.eval_batches):
        loss, n = eval_step(params, frozen, parallel.global_batch(next(eval_batches), sharding))
        total, count = total + float(loss), count + int(n)
    mean = total / max(count, 1)
    return {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50.0))}


def evaluate_model(config, model, variables: dict, tok=None) -> dict:
    """What a run of ``config`` reports at an evaluation, for any ``model`` and its ``variables``
    (``params`` may be absent: a merged model): eval loss and perplexity over the same eval
    batches and, with a generation set, exact match (plain and normalized) of greedy answers.
    ``tok``: the run's tokenizer (None: ``config.model_path``'s, or the byte tokenizer)."""
    validate_config(config)
    if tok is None:
        tok = load_tokenizer(config.model_path) if config.model_path else ByteTokenizer()
    data = build_data(config, tok)
    mesh = parallel.make_mesh({"data": 1, "fsdp": 1}, devices=jax.local_devices()[:1])
    params = variables.get("params", {})
    m = _evaluate(jax.jit(make_eval_step(model)), params, variables["base"], data.eval,
                  parallel.batch_sharding(mesh, 2), config)  # fmt: skip
    if data.generation:
        answers = _generate_answers(model, {**variables, "params": params}, tok, data.generation,
                                    config.data.target_max_len, data.stop_ids)  # fmt: skip
        m["exact_match"] = exact_match(answers, data.generation)
        m["exact_match_normalized"] = exact_match(answers, data.generation, normalize=True)
    return m


def _generate_answers(model, variables, tok, items: list[GenerationItem], max_new_tokens: int, stops) -> list[str]:
    """Greedy answers to ``items``' prompts, each cut at its first stop token."""
    width = max(len(it.prompt_ids) for it in items)
    ids = np.full((len(items), width), tok.pad_id, np.int32)
    mask = np.zeros((len(items), width), np.int32)
    for r, it in enumerate(items):  # left padding
        ids[r, width - len(it.prompt_ids) :], mask[r, width - len(it.prompt_ids) :] = it.prompt_ids, 1
    out = np.asarray(generate(model, variables, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=stops))
    answers = []
    for row in out[:, width:]:
        ends = np.flatnonzero(np.isin(row, stops))
        answers.append(tok.decode(row[: ends[0]] if ends.size else row))
    return answers


def check_tokenizer(tok, model_cfg, model_path: str) -> None:
    """Refuse a tokenizer whose ids index past the model's embedding (they would give NaN losses)."""
    where = f"{model_path}/config.json vocab_size" if model_path else "config.model"
    ids = {"vocab_size - 1": tok.vocab_size - 1, "bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}
    over = {k: v for k, v in ids.items() if v is not None and v >= model_cfg.vocab_size}
    if over:
        raise ValueError(
            f"the tokenizer ({model_path or 'byte-level'}) has {tok.vocab_size} ids but the model's embedding has "
            f"{model_cfg.vocab_size} rows ({where}); ids past it ({over}) would train on garbage and give NaN losses. "
            "Use the checkpoint's own tokenizer (tokenizer.json beside config.json)."
        )


def _stop_diverged(ckpt, workdir, what: str, checkpoint_every: int):
    step = ckpt.latest_step()  # saves are synchronous: the latest is complete
    where = workdir / "checkpoints"
    kept = (
        f"The last checkpoint (step {step}) in {where} is intact."
        if step is not None
        else f"No checkpoint was written yet (the first is due at step {checkpoint_every}): there is none to resume."
    )
    raise FloatingPointError(f"{what}; stopping. {kept}")


@dataclasses.dataclass(frozen=True)
class Setup:
    """What :func:`setup` builds: the model, its optimizer, the abstract state and its shardings
    (one :class:`~qlora_jax.train.state.StateLayout`), and the placed base and train state."""

    model: LlamaForCausalLM
    tokenizer: Any
    optimizer: Optimizer
    layout: StateLayout
    shardings: TrainTree  # NamedShardings of base, params and opt_state on the run's mesh
    base: Any  # the "base" collection, in its shardings (empty under trainable='full': it is state.params)
    state: TrainState

    @property
    def model_config(self) -> LlamaConfig:
        return self.model.config

    @property
    def state_shardings(self) -> TrainState:
        step = self.state.step.sharding
        return TrainState(step, self.shardings.params, self.shardings.opt_state)


def setup(config, mesh) -> Setup:
    """Model, tokenizer, base and train state, placed on ``mesh`` as ``config.sharding`` says.

    The state is first built abstract (:func:`~qlora_jax.train.state.state_layout`: ``eval_shape``
    of the model's and the optimizer's init), its shardings derived from it, and only then is the
    base loaded straight into them (each process reading the rows its devices hold) and the
    adapters and optimizer state created there. ``config`` is one :func:`validate_config` accepted.
    """
    parallel.check_batch_size(mesh, config.train.batch_size)
    model, tok = build_model(config)
    optimizer = build_optimizer(config)
    if config.train.trainable == "full":  # uint8 codes cannot be differentiated
        # a stacked (scanned) leaf holds one weight per layer
        stored = sum(
            x.packed.shape[0] if x.packed.ndim > 1 else 1 for x in quantized_leaves(abstract_variables(model)["base"])
        )
        if stored:
            raise ValueError(
                f"config.train.trainable='full' needs a 16/32-bit base, but config.model_path={config.model_path} "
                f"stores {stored} weights in 4 bits (a bitsandbytes checkpoint)"
            )
    check_tokenizer(tok, model.config, config.model_path)
    if model.lora is not None and (unknown := sorted(set(model.lora.targets) - set(model.config.linear_names))):
        raise ConfigError(  # named here, not from inside the model's trace
            "lora.targets", f"={tuple(config.lora.targets)!r}: {unknown} name no linear of this "
            f"{model.config.model_type} model (config.model_path={config.model_path}); its linears: "
            f"{','.join(model.config.linear_names)}"
        )  # fmt: skip
    if model.attention == "dot_product" and model.config.attn_logit_softcapping is not None:
        raise ConfigError(
            "train.attention", f"='dot_product' cannot soft-cap attention scores, which this "
            f"{model.config.model_type} model does (attn_logit_softcapping={model.config.attn_logit_softcapping}); "
            "use 'chunked'"
        )  # fmt: skip
    if config.train.router_aux_loss_coef > 0 and not model.config.num_experts:
        raise ConfigError(
            "train.router_aux_loss_coef", f"={config.train.router_aux_loss_coef}: this {model.config.model_type} "
            "model has no router (the load-balancing loss is for mixture-of-experts models); set it to 0"
        )  # fmt: skip
    if config.export.gguf and model.config.model_type not in gguf.EXPORTABLE:  # refused now, not after training
        raise ConfigError(
            "export.gguf", f"={config.export.gguf!r}: the GGUF writer covers {gguf.EXPORTABLE}, not this model's "
            f"model_type {model.config.model_type!r}; set it to '' and export.merged=True (safetensors)"
        )  # fmt: skip
    layout = state_layout(
        model, optimizer, config.train.trainable, mesh.shape["fsdp"], config.sharding.params,
        config.sharding.opt_state,
    )  # fmt: skip
    shardings = layout.shardings(mesh)
    params, base = split_params(_variables(config, model, layout, shardings))
    if layout.trainable == "full":
        params, base = base, {}  # every base weight is trainable
    base = parallel.place(base, shardings.base)
    params = parallel.place(params, shardings.params)
    opt_state = parallel.place(optimizer.tx.init(params), shardings.opt_state)
    _check_layout(layout, TrainTree(base, params, opt_state))
    step = jnp.int32(0)
    state = TrainState(parallel.place(step, parallel.array_sharding(step, mesh, "replicated")), params, opt_state)
    return Setup(model, tok, optimizer, layout, shardings, base, state)


def _check_layout(layout: StateLayout, built: TrainTree) -> None:
    """The state built must be the abstract one the shardings and the planner were derived from."""
    want = jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), layout.abstract)
    got = jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), built)
    if want != got:
        raise AssertionError(f"the train state built differs from its abstract layout: {got} vs {want}")


def jit_train_step(
    model, optimizer: Optimizer, state_shardings, seed: int, collection: str = "params", router_aux_loss_coef=0.0
):
    """The jitted step ``(state, base, batch) -> (state, metrics)``; the state keeps its shardings
    (and memory kinds) and is donated. The dropout key is a function of ``seed`` and the step, so
    a resumed run draws the same masks. ``router_aux_loss_coef``: config.train's (a MoE model)."""
    base_key = jax.random.key(seed + 1)
    step_fn = make_train_step(model, optimizer.tx, optimizer.schedule, collection, router_aux_loss_coef)
    return jax.jit(
        lambda state, base, batch: step_fn(state, base, batch, jax.random.fold_in(base_key, state.step)),
        donate_argnums=(0,),
        out_shardings=(state_shardings, None),
    )


def _full(config) -> bool:
    return config.train.trainable == "full"


def _collection(config) -> str:
    return "base" if _full(config) else "params"


def _is_chief() -> bool:
    return jax.process_index() == 0


def train_and_evaluate(config, workdir) -> dict:
    """Run (or resume) the fine-tune described by ``config`` in ``workdir``; returns the last metrics.

    The config is checked first (:func:`validate_config`); the workdir is then held for this run
    (:class:`WorkdirLock`), a resume must keep the run's config (:func:`check_resume`), and a
    finished run only reports its results (``config.export.again`` writes its exports again).
    With several processes (``jax.distributed``) every process runs this with the same config and
    a shared ``workdir``; only process 0 takes the lock and writes logs, samples and exports.
    """
    validate_config(config)
    config = with_init_adapter(config)
    workdir = pathlib.Path(workdir)
    chief = _is_chief()
    with WorkdirLock(workdir) if chief else contextlib.nullcontext():
        ckpt = Checkpoints(workdir, chief=chief)
        try:
            return _run(config, workdir, ckpt, chief)
        finally:
            ckpt.close()


def _check_workdir(config, workdir: pathlib.Path, ckpt: Checkpoints) -> dict | None:
    """Before anything is built: refuse a workdir this config cannot continue; the stored final
    metrics of a finished run (None: train)."""
    t = config.train
    steps = ckpt.steps()
    latest = steps[-1] if steps else None
    final_file = workdir / "final_metrics.json"
    at = f" (checkpoint at step {latest})" if latest is not None else ""
    changes = check_resume(workdir, config, latest is not None or final_file.exists(), at)
    for key, old, new in changes:
        logging.info("resuming %s with %s: %r -> %r", workdir, key, old, new)
        if key == "train.steps" and (
            t.lr_schedule != "constant" or round(t.warmup_ratio * old) != round(t.warmup_ratio * new)
        ):
            logging.warning(
                "train.steps %d -> %d: the learning-rate schedule (%s, warmup %g) is recomputed for %d steps; the "
                "resumed steps follow it, not the schedule the run started with", old, new, t.lr_schedule,
                t.warmup_ratio, new,
            )  # fmt: skip
    if t.steps == 0 and latest is not None:  # it would overwrite that run's metrics.jsonl
        raise RunConflict(
            f"config.train.steps=0 evaluates a model without training, but --workdir={workdir} holds a run{at}; "
            "use a new --workdir"
        )
    if latest is not None and latest > t.steps:
        raise RunConflict(
            f"--workdir={workdir} holds a run trained to step {latest}, beyond config.train.steps={t.steps}: set "
            f"config.train.steps >= {latest} to continue it"
        )
    finished = final_file.exists() and latest == (t.steps or None)
    if not finished:
        return None
    final = json.loads(final_file.read_text())
    if not config.export.again:
        logging.warning(
            "%s: this run finished at step %d; its results are in %s and were left as they are (a larger "
            "config.train.steps continues it; config.export.again=True writes its exports again)",
            workdir, t.steps, final_file,
        )  # fmt: skip
    return final


@dataclasses.dataclass
class _Run:
    """What one run's steps, evaluations and exports share (built by :func:`_run`)."""

    config: Any
    workdir: pathlib.Path
    ckpt: Checkpoints
    chief: bool
    mesh: Any
    model: Any
    tok: Any
    model_cfg: Any
    frozen: dict
    data: Data
    eval_step: Any
    metrics: MetricsWriter | None = None
    answers: dict = dataclasses.field(default_factory=dict)  # step -> the greedy answers its evaluation made

    @property
    def collection(self) -> str:
        return _collection(self.config)

    def generate(self, params) -> list[str]:
        """Greedy answers to the held-out generation set."""
        variables = _for_generation(params, self.frozen, self.collection)
        with jax.set_mesh(None):
            return _generate_answers(
                self.model, variables, self.tok, self.data.generation, self.config.data.target_max_len,
                self.data.stop_ids,
            )  # fmt: skip

    def evaluate(self, params, step: int) -> dict:
        """Eval loss and perplexity; with a generation set, exact match (plain and normalized)."""
        sharding = parallel.batch_sharding(self.mesh, 2)
        m = _evaluate(self.eval_step, params, self.frozen, self.data.eval, sharding, self.config)
        if self.data.generation:
            answers = self.answers[step] = self.generate(params)
            m["exact_match"] = exact_match(answers, self.data.generation)
            m["exact_match_normalized"] = exact_match(answers, self.data.generation, normalize=True)
        return m


def _run(config, workdir: pathlib.Path, ckpt: Checkpoints, chief: bool) -> dict:
    t = config.train
    final = _check_workdir(config, workdir, ckpt)
    if final is not None and not config.export.again:
        return final
    if chief:
        try:
            save_run_config(workdir, config)
        except OSError as e:
            raise write_failed(workdir / "run_config.json", e, ckpt) from e
    resume_step = ckpt.newest_intact()  # before the (slow) model build: a damaged workdir fails fast
    mesh = parallel.make_mesh(config.mesh.to_dict())
    built = setup(config, mesh)
    model, tok, state = built.model, built.tokenizer, built.state
    data = build_data(config, tok)
    run = _Run(
        config, workdir, ckpt, chief, mesh, model, tok, model.config, built.base, data,
        jax.jit(make_eval_step(model, _collection(config))),
    )  # fmt: skip

    if resume_step is None and chief and is_residual_init(config.lora.init):  # for the converted adapter export
        flat = traverse_util.flatten_dict(parallel.to_host(state.params))
        save_file({"/".join(k): np.asarray(v) for k, v in flat.items()}, str(workdir / INITIAL_ADAPTER))
    start, window = 0, None
    if resume_step is not None:
        state, meta = ckpt.restore(resume_step, jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
        data.train.restore(meta["data"])
        window = meta.get("window")  # absent from checkpoints of before 2026-12-02
        start = int(state.step)
        logging.info("resumed from step %d", start)
    again = start == 0 and final is None  # (re-)evaluate the model before training: no row of before stays
    # keeps only what the restored state had logged; a killed run may have logged further
    run.metrics = MetricsWriter(workdir, chief, start, fresh=again, ckpt=ckpt)
    rows = run.metrics.rows
    # a run killed after its last checkpoint (during the exports) has its final row logged already
    last = final or (rows[-1] if start and rows and rows[-1]["step"] == start else {})
    try:
        if again:  # the model before training (or, with train.steps=0, only that)
            with jax.set_mesh(mesh):
                last = {"step": 0, **run.evaluate(state.params, 0)}
            run.metrics.write(last)
        if start < t.steps:
            train_step = jit_train_step(
                model, built.optimizer, built.state_shardings, config.seed, run.collection,
                config.train.router_aux_loss_coef,
            )  # fmt: skip
            state, last = _train(run, train_step, state, start, window)
    finally:
        run.metrics.close()
    return _finish(run, state, last, write_final=final is None)


def _train(run: _Run, train_step, state, start: int, window: dict | None = None):
    """Steps ``start .. config.train.steps``: log, evaluate and checkpoint; returns ``(state, last metrics)``.

    ``processed_tokens`` (every non-padding token) and ``target_tokens`` (the loss targets) count
    the whole logging window (every step since the last log) from the host's copy of the batches;
    ``tokens_per_sec`` and ``target_tokens_per_sec`` divide them by the wall time of its steps
    (evaluations and checkpoint saves left out; the first window includes the compilation). ``tokens`` is
    the logged step's own target count, from the device. ``first_step_seconds`` (the first row
    after a start or resume) is the wall time of the first step: compiling it, then running it.
    ``window`` is the counts and seconds of a window a resumed run continues (checkpointed with
    the data position).
    """
    config = run.config
    t = config.train
    train_batch_sharding = parallel.batch_sharding(run.mesh, 3, batch_axis=1)  # [accum, B, T]
    last = {}
    # the first step compiles: shown as its own phase, and left out of the rate, so the ETA (from
    # the second step on) is steps left x the mean time of the steps since (smoothing=0)
    bar = tqdm(
        initial=start, total=t.steps, desc="train: compiling", smoothing=0, disable=not (config.progress and run.chief)
    )
    window = dict(window or {"tokens": 0, "targets": 0, "seconds": 0.0})
    window["start"] = time.perf_counter() - window.pop("seconds")
    began, first = time.perf_counter(), None
    with jax.set_mesh(run.mesh), bar:
        for step in range(start, t.steps):
            micro = [next(run.data.train) for _ in range(t.accum_steps)]
            host = {k: np.stack([m[k] for m in micro]) for k in micro[0]}
            window["tokens"] += int(host["attention_mask"].sum())
            window["targets"] += int(sum(target_mask(m, np).sum() for m in micro))
            state, metrics = train_step(state, run.frozen, parallel.global_batch(host, train_batch_sharding))
            done = step + 1
            if step == start:
                jax.block_until_ready(metrics)
                first = time.perf_counter() - began  # logged with the first row after a (re)start
                logging.info("step %d: %.1f s (compiling the train step, then running it)", done, first)
                bar.set_description("train", refresh=False)
                bar.initial, bar.start_t = bar.n + 1, time.time()  # the rate counts the steps after this one
            bar.update(1)
            evaluate = done % config.eval_every == 0 or done == t.steps
            if done % config.log_every == 0 or evaluate:  # an evaluation always gets its row
                m = {k: float(v) for k, v in metrics.items()}
                if not math.isfinite(m["loss"]):
                    _stop_diverged(
                        run.ckpt, run.workdir, f"non-finite loss {m['loss']} at step {done}", config.checkpoint_every
                    )
                elapsed = max(time.perf_counter() - window["start"], 1e-9)
                if first is not None:
                    m["first_step_seconds"], first = first, None
                m["processed_tokens"], m["target_tokens"] = window["tokens"], window["targets"]
                m["tokens_per_sec"] = window["tokens"] / elapsed
                m["target_tokens_per_sec"] = window["targets"] / elapsed
                stats = jax.local_devices()[0].memory_stats() or {}
                if "bytes_in_use" in stats:
                    m["device_bytes_in_use"] = stats["bytes_in_use"]
                if evaluate:
                    m.update(run.evaluate(state.params, done))
                last = {"step": done, **m}
                run.metrics.write(last)
                bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_sec']:.0f}")
                window = {"tokens": 0, "targets": 0, "start": time.perf_counter()}
            if done % config.checkpoint_every == 0 or done == t.steps:
                if not math.isfinite(float(metrics["loss"])):  # never checkpoint a diverged state
                    _stop_diverged(run.ckpt, run.workdir, f"non-finite loss at step {done}", config.checkpoint_every)
                seconds = time.perf_counter() - window["start"]
                open_window = {"tokens": window["tokens"], "targets": window["targets"], "seconds": seconds}
                run.ckpt.save(done, state, {"data": run.data.train.state(), "window": open_window})
                window["start"] = time.perf_counter() - seconds  # the save is not the steps' time
    return state, last


def _finish(run: _Run, state, last: dict, write_final: bool) -> dict:
    """Greedy samples and the exports; ``final_metrics.json`` unless the run had finished before."""
    config, workdir, model_cfg, tok = run.config, run.workdir, run.model_cfg, run.tok
    lora = _lora_config(config)
    params_host = parallel.to_host(state.params)  # collective: every process takes part
    exports_base = config.export.merged or config.export.quantized or config.export.gguf
    needs_base = not _full(config) and (not config.model_path or exports_base)
    base = parallel.to_host(run.frozen) if needs_base else None
    if run.data.generation:  # every data kind: the prompts, targets and greedy answers
        answers = run.answers.get(int(state.step)) or run.generate(state.params)  # the last eval's, if it made them
        if run.chief:
            with (workdir / "samples.jsonl").open("w") as f:
                for it, a in zip(run.data.generation, answers, strict=True):
                    f.write(json.dumps({"source": it.prompt, "target": it.target, "generated": a}) + "\n")
    if run.chief:
        initial = None
        if is_residual_init(lora.init):  # the adapters as the init made them (saved when the run began)
            initial = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in
                                                    load_file(workdir / INITIAL_ADAPTER).items()})  # fmt: skip
        write_exports(config, workdir / "export", model_cfg, tok, params_host, base, lora, _quant_config(config),
                      initial=initial)  # fmt: skip
        if write_final:
            (workdir / "final_metrics.json").write_text(json.dumps(last, indent=2) + "\n")
    return last


def _for_generation(params, frozen, collection: str) -> dict:
    """The variables for :func:`generate`: as they are on one host; gathered to every process's
    own devices when the arrays span hosts (generation then runs on each process's first device)."""
    variables = merge_params(params, frozen, collection)
    if jax.process_count() == 1:
        return variables
    return jax.device_put(parallel.to_host(variables), jax.local_devices()[0])
