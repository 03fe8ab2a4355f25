"""validate_config: every key of a fine-tune config checked once, each error naming the key and
its allowed range; which keys a resumed run may change."""

import json

import pytest

from experiments.configs import llama_alpaca, tiny, tiny_pretrain
from qlora_jax.train.validate import RULES, ConfigError, changed_keys, flatten, resumable, validate_config


def _config(**changes):
    c = tiny.get_config()
    for key, value in changes.items():
        *parents, leaf = key.split("__")
        node = c
        for p in parents:
            node = node[p]
        with node.ignore_type():  # the command line refuses a value of another type; a file need not
            node[leaf] = value
    return c


def test_the_shipped_configs_are_valid(tmp_path):
    for module in (tiny, tiny_pretrain):
        validate_config(module.get_config())
    c = llama_alpaca.get_config()  # needs its two paths
    (tmp_path / "data.jsonl").write_text("{}\n")
    c.model_path, c.data.path = str(tmp_path), str(tmp_path / "data.jsonl")
    validate_config(c)


def test_every_key_of_tiny_has_a_rule():
    assert sorted(flatten(tiny.get_config())) == sorted(RULES)


def test_the_small_variant_is_tiny_shrunk_and_valid():
    """``--config=experiments/configs/tiny.py:small``: the same keys, valid, only SMALL's values changed."""
    full, small = flatten(tiny.get_config()), flatten(tiny.get_config("small"))
    validate_config(tiny.get_config("small"))
    assert sorted(small) == sorted(full)
    assert {k: v for k, v in small.items() if v != full[k]} == tiny.SMALL
    assert small["model.num_hidden_layers"] == 1 and small["num_generate"] == 0
    assert flatten(tiny.get_config("")) == full  # "tiny.py:" is the full config
    assert flatten(tiny.shrink(tiny_pretrain.get_config()))["train.batch_size"] == 8
    validate_config(tiny.shrink(tiny_pretrain.get_config()))


def test_an_unknown_variant_of_tiny_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"unknown config variant 'smal' .*tiny.py:smal\); the variants: 'small'"):
        tiny.get_config("smal")


@pytest.mark.parametrize(
    "key, value, match",
    [
        # the cases that trained wrong without a word
        ("train__max_grad_norm", -1.0, r"config.train.max_grad_norm must be > 0 \(the clipping threshold"),
        ("train__max_grad_norm", 0.0, r"config.train.max_grad_norm must be > 0"),
        ("eval_batches", 0, r"config.eval_batches must be an integer >= 1 .*; got 0"),
        ("lora__rank", 0, r"config.lora.rank must be >= 1 with train.trainable='lora' \(rank 0 trains nothing\)"),
        # the cases that crashed deep in the loop
        ("train__batch_size", 0, r"config.train.batch_size must be an integer >= 1; got 0"),
        ("train__accum_steps", -2, r"config.train.accum_steps must be an integer >= 1; got -2"),
        ("log_every", 0, r"config.log_every must be an integer >= 1 \(steps\); got 0"),
        ("checkpoint_every", 0, r"config.checkpoint_every must be an integer >= 1 \(steps\); got 0"),
        ("eval_every", -1, r"config.eval_every must be an integer >= 1"),
        # ranges and choices
        ("quant__block_size", 48, r"config.quant.block_size must be one of \(32, 64, .*4096\); got 48"),
        ("quant__block_size", 0, r"config.quant.block_size must be one of"),
        ("quant__type", "nf5", r"config.quant.type must be one of \('nf4', 'fp4', 'int4'\); got 'nf5'"),
        ("lora__dropout", 1.0, r"config.lora.dropout must be >= 0 and < 1; got 1.0"),
        ("lora__alpha", float("nan"), r"config.lora.alpha must be a finite number > 0; got nan"),
        ("lora__targets", ("q_proj", "qkv"), r"config.lora.targets names \['qkv'\], not among \('q_proj'"),
        ("lora__targets", (), r"config.lora.targets must name at least one of"),
        ("lora__targets", "q_proj", r"config.lora.targets must be a tuple of names"),
        ("train__learning_rate", float("inf"), r"config.train.learning_rate must be a finite number > 0"),
        ("train__warmup_ratio", 1.5, r"config.train.warmup_ratio must be >= 0 and <= 1 \(a fraction"),
        ("train__adam_b2", 1.0, r"config.train.adam_b2 must be >= 0 and < 1"),
        ("train__weight_decay", -0.1, r"config.train.weight_decay must be >= 0"),
        ("train__optimizer", "sgd", r"config.train.optimizer must be one of \('paged_adamw', 'adamw'"),
        ("train__lr_schedule", "cosine_with_restarts", r"config.train.lr_schedule must be one of \('constant'"),
        ("train__paged_chunk_bytes", -1, r"config.train.paged_chunk_bytes must be an integer >= 0"),
        ("train__steps", -1, r"config.train.steps must be an integer >= 0 \(0: evaluate only\); got -1"),
        ("train__dtype", "float64", r"config.train.dtype must be one of"),
        ("train__remat_policy", "offload_all", r"config.train.remat_policy must be one of \('nothing_saveable', "),
        ("train__attention", "flash", r"config.train.attention must be one of \('chunked', 'reference', 'dot_"),
        ("train__attention_chunk", 0, r"config.train.attention_chunk must be an integer >= 1 \(keys"),
        ("train__router_aux_loss_coef", -0.01, r"config.train.router_aux_loss_coef must be >= 0"),
        ("train__moe_dispatch", "loop", r"config.train.moe_dispatch must be one of \('sorted', 'dense'\)"),
        ("data__target_max_len", 0, r"config.data.target_max_len must be an integer >= 1"),
        ("data__families", ("add", "mul"), r"config.data.families names \['mul'\]"),
        ("data__num_eval", 0, r"config.data.num_eval must be an integer >= 1"),
        ("mesh__fsdp", 0, r"config.mesh.fsdp must be an integer >= 1, or -1"),
        ("sharding__params", "zero3", r"config.sharding.params must be one of \('replicated', 'fsdp'\)"),
        ("seed", -1, r"config.seed must be an integer >= 0"),
        ("train__batch_size", 2.5, r"config.train.batch_size must be an integer >= 1; got 2.5"),
        ("progress", 1, r"config.progress must be True or False; got 1"),
        ("model__hidden_size", 130, r"config.model.hidden_size must be a multiple of model.num_attention_heads=4"),
        ("model__num_key_value_heads", 3, r"config.model.num_attention_heads must be a multiple of .*=3"),
        ("data__kind", "jsonl", r"config.data.path is required with data.kind='jsonl'"),
        ("model_path", "/nonexistent/ckpt", r"config.model_path='/nonexistent/ckpt': no such checkpoint directory"),
        ("train__trainable", "full", r"config.train.trainable='full' trains the unquantized base itself"),
    ],
)
def test_bad_values_are_refused_naming_the_key_and_range(key, value, match):
    c = _config(**{key: value})
    with pytest.raises(ConfigError, match=match) as e:
        validate_config(c)
    assert e.value.key in (key.replace("__", "."), "lora.rank", "model.num_attention_heads", "data.path")


def test_missing_and_unknown_keys_are_refused():
    c = tiny.get_config()
    del c.train["max_grad_norm"]
    with pytest.raises(ConfigError, match=r"config.train.max_grad_norm is missing"):
        validate_config(c)
    c = tiny.get_config()
    c.train.max_grad_nrom = 1.0
    with pytest.raises(ConfigError, match=r"config.train.max_grad_nrom is not a known key"):
        validate_config(c)


def test_resume_may_change_bookkeeping_only():
    assert all(resumable(k) for k in ("train.steps", "log_every", "export.merged", "mesh.fsdp", "progress"))
    assert not any(resumable(k) for k in ("seed", "quant.type", "quant.enabled", "train.batch_size", "lora.rank"))
    old, new = tiny.get_config(), tiny.get_config()
    new.seed, new.lora.targets, new.log_every = 3, ("q_proj",), 5
    assert changed_keys(old, new) == [
        ("log_every", 10, 5),
        ("lora.targets", list(old.lora.targets), ["q_proj"]),
        ("seed", 0, 3),
    ]
    assert changed_keys(json.loads(old.to_json()), old) == []  # tuples read back as lists compare equal


def test_the_models_checkpointing_and_attention_are_the_configs():
    from qlora_jax.train.train_lib import build_model

    c = _config(train__remat=True, train__remat_policy="save_linears", train__attention="reference",
                train__attention_chunk=64, train__moe_dispatch="dense")  # fmt: skip
    validate_config(c)
    model, _ = build_model(c)
    assert (model.remat, model.remat_policy, model.attention, model.attention_chunk, model.moe_dispatch) == (
        True, "save_linears", "reference", 64, "dense",
    )  # fmt: skip
