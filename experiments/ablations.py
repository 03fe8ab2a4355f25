"""Runs behind the ablation notebooks (``notebooks/``): a cached full-parameter pre-step that gives
the tiny model a meaningful base, and cached QLoRA fine-tunes from it with config overrides.

    from experiments import ablations
    base = ablations.pretrained_base()  # runs/ablations/pretrain/export/model
    rows = ablations.finetune("nf4_dq", {"quant.type": "nf4"})  # its metrics.jsonl rows
    runs = ablations.finetune_seeds("nf4_dq", {"quant.type": "nf4"})  # {seed: rows}
    mean, std = ablations.summarize(runs)  # final eval loss over the seeds
    ablations.evaluate_base("fp4", {"quant.type": "fp4"})  # the base stored in FP4, untrained

Everything goes through ``experiments.finetune``'s own ``train_and_evaluate`` and config files, so a
notebook shows what the command line would produce. ``QLORA_NOTEBOOK_FAST=1`` (set by ``make
test``) shrinks steps and data so each notebook runs in CI in well under 3 minutes; its runs go to
a separate directory, so fast and full results never mix. A finished run is read back, not rerun.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import shutil

import numpy as np

from experiments.configs import smollm2, tiny, tiny_pretrain
from qlora_jax.train.train_lib import train_and_evaluate

FAST = os.environ.get("QLORA_NOTEBOOK_FAST", "") == "1"
ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / ("ablations_fast" if FAST else "ablations")
# the notebooks' PNGs; the fast mode never overwrites the committed full-run figures
FIGURES = ROOT / "notebooks" / ("figures_fast" if FAST else "figures")
PRETRAIN_FAMILIES = ("reverse", "upper")  # configs/tiny_pretrain.py
FINETUNE_FAMILIES = ("add", "sort", "reverse", "upper")  # two new families and the pre-step's two

# sizes, fast mode first; the full pre-step is configs/tiny_pretrain.py as it stands
FINETUNE_STEPS = 6 if FAST else 200
EVAL_EVERY = 3 if FAST else 25
SEEDS = (0,) if FAST else (0, 1, 2)  # each fine-tune setting is repeated over these seeds


def _spec(config) -> str:
    """What identifies a run: its config, with the base named relative to the repo (a moved
    checkout keeps its cache) and, for a base of ours, that base's own spec: a retrained pre-step
    reruns everything built on it."""
    if not config.model_path or config.model_path.startswith("wheel:"):  # a packaged model: the name says it
        return config.to_json(sort_keys=True)
    spec = json.loads(config.to_json(sort_keys=True))
    base = pathlib.Path(spec["model_path"])
    stamp = base.parents[1] / "ablation_config.json"
    spec["model_path"] = os.path.relpath(base, ROOT)
    spec["base_spec"] = stamp.read_text() if stamp.exists() else None
    return json.dumps(spec, sort_keys=True)


def _run(config, workdir: pathlib.Path) -> list[dict]:
    spec = _spec(config)
    stamp = workdir / "ablation_config.json"
    RUNS.mkdir(parents=True, exist_ok=True)
    # notebooks run in parallel (pytest -n 2) share the pre-step: one trains it, the other waits
    with open(RUNS / f".{workdir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text() != spec:  # same name, other settings: start over
            shutil.rmtree(workdir)
        if not (workdir / "final_metrics.json").exists():
            workdir.mkdir(parents=True, exist_ok=True)
            stamp.write_text(spec)
            train_and_evaluate(config, workdir)
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def pretrained_base() -> pathlib.Path:
    """The tiny LLaMA after the full-parameter pre-step (``configs/tiny_pretrain.py``): an HF
    checkpoint directory with its tokenizer, trained once and then reused."""
    c = tiny_pretrain.get_config()
    c.progress = False
    if FAST:  # the sizes of configs/tiny.py's small variant (compile time dominates)
        c.train.steps, c.eval_every, c.checkpoint_every = 10, 5, 10
        tiny.shrink(c)
    _run(c, RUNS / "pretrain")
    return RUNS / "pretrain" / "export" / "model"


def finetune_config(overrides: dict | None = None):
    """``configs/tiny.py`` fine-tuning the pre-trained base on all four task families (two of
    them new to it)."""
    c = tiny.get_config("small" if FAST else None)  # fast: its small variant, the pre-step's sizes
    c.model_path = str(pretrained_base())
    c.data.families = FINETUNE_FAMILIES
    c.train.steps = FINETUNE_STEPS
    c.eval_every = c.log_every = EVAL_EVERY
    c.checkpoint_every = FINETUNE_STEPS
    c.progress = False
    # decayed to 0, the last evaluation is not at the mercy of the last few constant-lr steps
    c.train.lr_schedule = "cosine"
    if not FAST:  # with 64 eval examples the spread over seeds dwarfed the effects measured
        c.data.num_eval, c.eval_batches, c.num_generate = 512, 32, 128
    c.lock()  # as on the command line, a misspelled key is an error, not a new field
    c.update_from_flattened_dict(overrides or {})
    return c


def default_model_config(overrides: dict | None = None):
    """The default fine-tune (``configs/smollm2.py``: SmolLM2-135M-Instruct, NF4 + DQ, chat-formatted
    synthetic tasks, 80 steps); in fast mode :func:`finetune_config`'s tiny base instead, a few steps."""
    if FAST:
        return finetune_config(overrides)
    c = smollm2.get_config()
    c.progress = False
    c.lock()
    c.update_from_flattened_dict(overrides or {})
    return c


def run(config, name: str) -> list[dict]:
    """Train (or read back) ``config`` as the run ``name`` under :data:`RUNS`; its metrics rows."""
    return _run(config, RUNS / name)


def finetune(name: str, overrides: dict | None = None) -> list[dict]:
    """Fine-tune (or read back) the run ``name`` with ``overrides`` (dotted config keys); returns
    its ``metrics.jsonl`` rows. The name identifies the cache: change the overrides, change it."""
    return _run(finetune_config(overrides), RUNS / name)


def finetune_seeds(name: str, overrides: dict | None = None, seeds: tuple[int, ...] = SEEDS) -> dict[int, list[dict]]:
    """``finetune`` once per seed (``config.seed``: adapter init, data, dropout and the eval set); runs
    are cached as ``name`` (seed 0) and ``name_seed<k>``."""
    return {s: finetune(name if s == 0 else f"{name}_seed{s}", {**(overrides or {}), "seed": s}) for s in seeds}


def summarize(
    runs: dict[int, list[dict]], key: str = "eval_loss", baseline: dict[int, list[dict]] | None = None
) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one run) over seeds of ``key`` at the last
    evaluation. With ``baseline`` (runs of the same seeds), of the per-seed differences
    ``runs - baseline``: the seed also draws the eval set, and pairing cancels its sampling."""
    values = np.array([final(rows)[key] for rows in runs.values()], np.float64)
    if baseline is not None:
        if sorted(baseline) != sorted(runs):
            raise ValueError(f"baseline seeds {sorted(baseline)} differ from the runs' seeds {sorted(runs)}")
        values -= np.array([final(baseline[s])[key] for s in runs], np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def evaluate_base(name: str, overrides: dict | None = None) -> dict:
    """Final metrics (eval loss, perplexity and, unless fast, exact match) of the pre-trained base
    as stored by ``overrides`` (e.g. in FP4), on the pre-step's own task families, without
    training (``train.steps=0``)."""
    settings = {"train.steps": 0, "data.families": PRETRAIN_FAMILIES}
    if not FAST:  # no training noise here, only the sampling of the eval set: make it large
        settings |= {"data.num_eval": 1024, "eval_batches": 64, "num_generate": 256}
    _run(finetune_config({**settings, **(overrides or {})}), RUNS / name)
    return json.loads((RUNS / name / "final_metrics.json").read_text())


def pretrain_metrics() -> dict:
    """Final metrics of the pre-step (trained first if need be)."""
    return json.loads((pretrained_base().parents[1] / "final_metrics.json").read_text())


def final(rows: list[dict]) -> dict:
    """The last row that has evaluation metrics."""
    return [r for r in rows if "eval_loss" in r][-1]
