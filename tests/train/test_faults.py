"""Faults around a run, through the real entry point in subprocesses (marker ``faults``): a second run
on a held workdir, stale locks, resumes with another config, re-running a finished run, failed
checkpoint writes (a file-size limit as a full disk, a read-only bind mount), damaged checkpoints,
and bad config values. The oracle of every recovery is an uninterrupted run of the same config:
identical metrics."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from finetune_cli import ROOT, cmd, metrics, run

from qlora_jax.train.workdir import WorkdirLock

pytestmark = pytest.mark.faults
SHORT = ("--config.train.steps=4", "--config.checkpoint_every=2")  # checkpoints at steps 2 and 4


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("short")
    run(workdir, *SHORT)
    return workdir


def _copy(src, tmp_path, name="run"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


# --- one run per workdir --------------------------------------------------------------------------


def test_a_second_run_on_a_held_workdir_is_refused_naming_the_holder(tmp_path):
    with WorkdirLock(tmp_path):  # this test process is the live holder
        began = time.monotonic()
        result = run(tmp_path, *SHORT, check=False)
        took = time.monotonic() - began
    assert result.returncode != 0
    want = f"--workdir={tmp_path} is in use by another run: pid {os.getpid()} on host {socket.gethostname()}"
    assert want in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()
    assert took < 60, took  # refused before the model is built (measured: ~3 s of imports)


def test_the_stale_lock_of_a_dead_process_is_taken_over(short_run, tmp_path):
    workdir = _copy(short_run, tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    (workdir / ".lock").write_text(json.dumps({"pid": dead.pid, "host": host, "started": "earlier"}))
    result = run(workdir, *SHORT)  # a finished run: the lock is all this exercises
    assert f"taking over the stale lock of pid {dead.pid} on {host}" in result.stderr
    assert "this run finished at step 4" in result.stderr
    assert (workdir / ".lock").read_text() == ""  # released at the end


def test_a_lock_recorded_by_another_host_is_not_guessed_at(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 4242, "host": "node-17", "started": "earlier"}))
    result = run(tmp_path, *SHORT, check=False)
    assert result.returncode != 0
    assert "locked by pid 4242 on host 'node-17'" in result.stderr
    assert f"If that run is gone, delete {tmp_path / '.lock'}" in result.stderr


# --- resume keeps the run's config -----------------------------------------------------------------


def test_resume_with_another_model_data_or_optimizer_is_refused_naming_every_key(short_run, tmp_path):
    workdir = _copy(short_run, tmp_path)
    (workdir / "final_metrics.json").unlink()  # as if killed after the last checkpoint
    before = (workdir / "metrics.jsonl").read_text()
    result = run(
        workdir, *SHORT, "--config.seed=1", "--config.quant.type=fp4", "--config.train.batch_size=4", check=False
    )
    assert result.returncode != 0
    assert "holds a run (checkpoint at step 4) with another config" in result.stderr
    for line in ("quant.type: 'nf4' -> 'fp4'", "seed: 0 -> 1", "train.batch_size: 8 -> 4"):
        assert line in result.stderr
    # these used to fail deep inside orbax ("tree structures do not match")
    result = run(workdir, *SHORT, "--config.lora.rank=8", "--config.train.optimizer=adamw", check=False)
    assert result.returncode != 0
    assert "lora.rank: 16 -> 8" in result.stderr and "train.optimizer: 'paged_adamw' -> 'adamw'" in result.stderr
    assert "Traceback" not in result.stderr
    assert (workdir / "metrics.jsonl").read_text() == before


def test_resume_may_extend_the_run_and_change_bookkeeping(short_run, tmp_path):
    workdir = _copy(short_run, tmp_path)
    run(workdir, "--config.train.steps=6", "--config.checkpoint_every=3", "--config.eval_every=3")
    rows = metrics(workdir)
    assert rows[:5] == metrics(short_run) and [r["step"] for r in rows[5:]] == [5, 6]
    assert json.loads((workdir / "final_metrics.json").read_text())["step"] == 6
    assert json.loads((workdir / "run_config.json").read_text())["train"]["steps"] == 6


# --- a finished run keeps its results ---------------------------------------------------------------


def test_rerunning_a_finished_run_says_so_and_keeps_its_results(short_run, tmp_path):
    workdir = _copy(short_run, tmp_path)
    files = {name: (workdir / name).read_bytes() for name in ("final_metrics.json", "metrics.jsonl", "samples.jsonl")}
    result = run(workdir, *SHORT)
    assert f"this run finished at step 4; its results are in {workdir / 'final_metrics.json'}" in result.stderr
    assert {name: (workdir / name).read_bytes() for name in files} == files
    assert "'exact_match'" in result.stdout and "'eval_loss'" in result.stdout  # the stored metrics, not a stub
    # asked to, it writes the exports again (here with a merged model too), still keeping the results
    run(workdir, *SHORT, "--config.export.again=True", "--config.export.merged=True")
    assert (workdir / "export" / "merged" / "model.safetensors").exists()
    assert {name: (workdir / name).read_bytes() for name in files} == files


# --- failed checkpoint writes stop the run at once, and nothing is lost ----------------------------


def _our_messages(stderr: str) -> list[str]:
    """The entry point's own error lines. tensorstore's writer threads may still print "Event loop is
    closed" tracebacks of the abandoned writes around them (C++ callbacks, outside Python logging)."""
    return [line for line in stderr.splitlines() if line.startswith("experiments.finetune:")]


def _with_file_size_limit(limit: int, command: list[str]) -> list[str]:
    """``command`` run with RLIMIT_FSIZE = ``limit`` bytes (set in the child itself: no preexec_fn
    forking out of this threaded test process)."""
    setter = (
        f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", setter, *command]


def test_a_full_disk_at_a_save_stops_the_run_with_one_message(tmp_path):
    """RLIMIT_FSIZE makes every write past 4 KiB fail (EFBIG) the way a full disk fails (ENOSPC):
    the first save's shardings file does not fit, the metrics lines do. It used to be skipped and
    reported only at the next save, under dozens of orbax tracebacks."""
    result = subprocess.run(
        _with_file_size_limit(4096, cmd(tmp_path, *SHORT)), cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode != 0
    (message,) = _our_messages(result.stderr)
    assert message.startswith(f"experiments.finetune: CheckpointError: saving checkpoint step 2 to {tmp_path}/checkp")
    assert "[Errno 27] File too large" in message and "no checkpoint has been written yet" in message
    assert "orbax" not in result.stderr.replace(message, "")  # its tracebacks went to checkpoint_error.log
    assert "Error writing" in (tmp_path / "checkpoint_error.log").read_text()
    assert list((tmp_path / "checkpoints").iterdir()) == []  # nothing partial for a resume to pick


def _read_only_checkpoints(workdir):
    """A command prefix that runs the entry point with ``workdir/checkpoints`` bind-mounted read-only
    in a mount namespace of its own (gone when it exits); None where namespaces are not allowed."""
    ck = workdir / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "--mount"], ["unshare", "--mount", "--map-root-user"]):
        probe = [*prefix, "sh", "-c", f"mount --bind -o ro {ck} {ck} && ! touch {ck}/probe"]
        if subprocess.run(probe, capture_output=True).returncode == 0:
            return [*prefix, "sh", "-c", f'mount --bind -o ro {ck} {ck} && exec "$@"', "sh"]
    return None


def test_a_read_only_checkpoint_directory_stops_the_run_at_once_without_hanging(short_run, tmp_path):
    """With only checkpoints/ read-only the run printed an OSError at the save and then sat at 0 % CPU
    in orbax's background threads until killed (168 s). Here the run is extended from step 4."""
    workdir = _copy(short_run, tmp_path)
    prefix = _read_only_checkpoints(workdir)
    if prefix is None:
        pytest.skip("needs a mount namespace (unshare --mount) to make checkpoints/ read-only")
    extra = ("--config.train.steps=6", "--config.checkpoint_every=2")
    began = time.monotonic()
    result = subprocess.run(
        [*prefix, *cmd(workdir, *extra)], cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode != 0 and time.monotonic() - began < 120
    (message,) = _our_messages(result.stderr)
    assert f"saving checkpoint step 6 to {workdir}/checkpoints failed: [Errno 30] Read-only file system" in message
    assert "the last intact checkpoint is step 4" in message
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
    run(workdir, *extra)  # writable again: the same command resumes
    rows = metrics(workdir)
    assert rows[:5] == metrics(short_run) and [r["step"] for r in rows[5:]] == [5, 6]


# --- damaged checkpoints are detected and fallen back from ------------------------------------------


def _largest_data_file(step_dir):
    return max(
        (p for p in step_dir.rglob("*") if p.is_file() and "/d/" in p.as_posix()), key=lambda p: p.stat().st_size
    )


def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(short_run, tmp_path):
    """A single bit flip used to restore silently with changed values (a truncated file is the next
    test's damage: it stopped the resume with ZSTD_decompressStream() failed)."""
    workdir = _copy(short_run, tmp_path)
    (workdir / "final_metrics.json").unlink()  # killed after its last checkpoint: the resume restores it
    victim = _largest_data_file(workdir / "checkpoints" / "4")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x10
    victim.write_bytes(bytes(data))
    result = run(workdir, *SHORT)
    rel = victim.relative_to(workdir / "checkpoints" / "4").as_posix()
    assert f"checkpoint step 4 in {workdir / 'checkpoints'} is damaged ({rel} does not match" in result.stderr
    assert "falling back to step 2" in result.stderr
    assert metrics(workdir) == metrics(short_run)
    (moved,) = (workdir / "checkpoints.corrupt").iterdir()
    assert moved.name.startswith("4-") and (moved / rel).read_bytes() == bytes(data)  # kept for inspection


def test_no_intact_checkpoint_is_a_clear_error(short_run, tmp_path):
    workdir = _copy(short_run, tmp_path)
    (workdir / "final_metrics.json").unlink()
    for step in ("2", "4"):
        victim = _largest_data_file(workdir / "checkpoints" / step)
        victim.write_bytes(victim.read_bytes()[:-1])
    result = run(workdir, *SHORT, check=False)
    assert result.returncode != 0
    assert f"no intact checkpoint in {workdir / 'checkpoints'} (step 4: " in result.stderr
    assert "step 2: " in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]  # nothing moved


# --- stops and refusals say what is true -------------------------------------------------------------


def test_a_config_value_that_would_train_wrong_is_refused_at_once(tmp_path):
    result = run(tmp_path, "--config.train.max_grad_norm=-1", check=False)
    assert result.returncode != 0
    assert "ConfigError: config.train.max_grad_norm must be > 0 (the clipping threshold; inf: no clipping)" in (
        result.stderr
    )
    assert not tmp_path.joinpath("metrics.jsonl").exists()
