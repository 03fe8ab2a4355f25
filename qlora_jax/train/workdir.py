"""A run's working directory kept safe: one run at a time, a resume only of the same run, and
checkpoints that are written whole, verified and fallen back from when damaged.

* :class:`WorkdirLock` — ``<workdir>/.lock``: an ``flock`` held for the whole run (the kernel
  drops it when the process dies, however it dies) and the holder's pid, host and start time. A
  second run refuses at once, naming them; the record a killed run left behind on this host is
  taken over with a warning.
* :func:`check_resume` — ``<workdir>/run_config.json`` holds the resolved config of the run;
  a resume may change only :data:`~qlora_jax.train.validate.RESUMABLE` keys (how long it runs,
  what it logs and writes, the memory layout), and every other change is refused, naming
  ``key: old -> new``.
* :class:`Checkpoints` — orbax checkpoints written synchronously, so a failed write stops the
  run at once with one message (the path, the OS error, the last intact step) instead of
  failing later in a background thread or hanging at exit; each committed step gets a SHA-256
  manifest of its files, verified on restore, and a damaged step is moved aside
  (``<workdir>/checkpoints.corrupt/``) with a warning so the newest intact one is restored.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import socket
import time
import traceback

import jax
import orbax.checkpoint as ocp

from qlora_jax.train.validate import changed_keys, resumable

MANIFEST = "qlora_digest.json"
RUN_CONFIG = "run_config.json"
LOCK = ".lock"


class WorkdirBusy(RuntimeError):
    """Another run holds the working directory."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or none can be restored."""


class WorkdirWriteError(RuntimeError):
    """A log file of the run (``metrics.jsonl``) could not be written."""


def write_failed(path, error: OSError, ckpt: Checkpoints) -> WorkdirWriteError:
    """The error for a failed write of ``path`` during a run: the OS error and where to resume."""
    step = ckpt.latest_step()
    kept = f"the last intact checkpoint is step {step}" if step is not None else "no checkpoint has been written yet"
    return WorkdirWriteError(
        f"writing {path} failed: {_os_error(error)}; {kept}. Free space and re-run the same command to resume "
        "(a line cut short is dropped)."
    )


class RunConflict(ValueError):
    """The workdir holds a run this config cannot continue."""


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkdirLock:
    """Exclusive use of ``workdir`` by this process for a ``with`` block (see the module docstring)."""

    def __init__(self, workdir):
        self.workdir = pathlib.Path(workdir)
        self.path = self.workdir / LOCK
        self._fd: int | None = None

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}

    def __enter__(self) -> WorkdirLock:
        self.workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # e.g. ENOLCK: a filesystem without locks
                logging.warning("%s: no flock here (%s); relying on the pid record alone", self.path, _os_error(e))
                return self._take(fd, flocked=False)
            os.close(fd)
            h = self._holder()
            raise WorkdirBusy(
                f"--workdir={self.workdir} is in use by another run: pid {h.get('pid', '?')} on host "
                f"{h.get('host', '?')}, started {h.get('started', '?')} ({self.path}). Wait for it to finish or "
                "stop it, or use another --workdir."
            ) from None
        return self._take(fd, flocked=True)

    def _take(self, fd: int, flocked: bool) -> WorkdirLock:
        held = self._holder()
        host = socket.gethostname()
        if held.get("pid") and held.get("pid") != os.getpid():
            if not flocked and held.get("host") == host and _pid_alive(int(held["pid"])):
                os.close(fd)
                raise WorkdirBusy(
                    f"--workdir={self.workdir} is in use by another run: pid {held['pid']} on host {host}, started "
                    f"{held.get('started')} ({self.path})"
                )
            if held.get("host") != host:  # flock may not span hosts on a shared filesystem: don't guess
                os.close(fd)
                raise WorkdirBusy(
                    f"--workdir={self.workdir} is locked by pid {held['pid']} on host {held.get('host')!r} "
                    f"(started {held.get('started')}), which this host cannot check. If that run is gone, delete "
                    f"{self.path}."
                )
            logging.warning(
                "%s: taking over the stale lock of pid %s on %s (started %s): that process is gone%s",
                self.workdir, held["pid"], host, held.get("started"),
                "" if not _pid_alive(int(held["pid"])) else " (its pid now belongs to another process)",
            )  # fmt: skip
        record = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # never unlink: another process may be waiting on this inode
            with contextlib.suppress(OSError):  # not locked where the filesystem has no flock
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def check_resume(workdir, config, holds_run: bool, start_hint: str = "") -> list[tuple]:
    """Refuse to resume ``workdir``'s run with a config that changes the run itself.

    ``holds_run``: the workdir has a checkpoint or final results. Returns the allowed changes
    ``(key, old, new)`` (empty for a new run). Raises ValueError naming every differing key that
    is not :func:`~qlora_jax.train.validate.resumable`.
    """
    path = pathlib.Path(workdir) / RUN_CONFIG
    if not holds_run or not path.exists():
        if holds_run:
            logging.warning("%s: no %s (an older run): the resumed config cannot be checked", workdir, RUN_CONFIG)
        return []
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: unreadable ({e}); it records the run's config, needed to resume") from None
    diffs = changed_keys(saved, json.loads(config.to_json()))
    refused = [d for d in diffs if not resumable(d[0])]
    if refused:
        lines = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, old, new in refused)
        raise RunConflict(
            f"--workdir={workdir} holds a run{start_hint} with another config; resuming it would change what it "
            f"trains:\n{lines}\nThese keys fix the model, data or optimizer: use a new --workdir for a different "
            "run, or the run's own values to resume it."
        )
    return diffs


def save_run_config(workdir, config) -> None:
    _write_atomic(pathlib.Path(workdir) / RUN_CONFIG, config.to_json(indent=2, sort_keys=True) + "\n")


def _digest(path: pathlib.Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(step_dir: pathlib.Path) -> dict[str, int]:
    out = {}
    for p in sorted(step_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(step_dir).as_posix()] = p.stat().st_size
    return out


def _os_error(e: BaseException) -> str:
    """``[Errno 28] No space left on device``-like text for an exception from a checkpoint write."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return f"[Errno {seen.errno}] {os.strerror(seen.errno)}"
        seen = seen.__cause__ or seen.__context__
    m = re.search(r"os_error_code='?(\d+)", str(e))  # tensorstore reports the errno in its message
    if m:
        code = int(m.group(1))
        return f"[Errno {code}] {os.strerror(code)} ({errno.errorcode.get(code, '?')})"
    return str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__


class _HoldOrbaxErrors(logging.Filter):
    """Keeps orbax's WARNING and ERROR records (a traceback per failing write thread) in ``held``
    instead of the log; with ``about``, only those whose message names that path or that carry a
    traceback (a failed save's writer threads, reporting after it returned: seen as a WARNING with
    the EFBIG traceback when the machine was loaded)."""

    def __init__(self, held: list, about: str | None = None):
        super().__init__()
        self.held, self.about = held, about

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        if self.about is not None and self.about not in record.getMessage() and not record.exc_info:
            return True
        self.held.append(record)
        return False


_LOGGERS = ("absl", "")  # orbax logs through absl; "" is the root logger


@contextlib.contextmanager
def _held_orbax_errors(held: list):
    hold = _HoldOrbaxErrors(held)
    for name in _LOGGERS:
        logging.getLogger(name).addFilter(hold)
    try:
        yield
    finally:
        for name in _LOGGERS:
            logging.getLogger(name).removeFilter(hold)


class Checkpoints:
    """The run's orbax checkpoints (``<workdir>/checkpoints``), two kept, each verified by digest."""

    def __init__(self, workdir, *, max_to_keep: int = 2, chief: bool = True):
        self.workdir = pathlib.Path(workdir)
        self.directory = (self.workdir / "checkpoints").absolute()
        self.chief = chief
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
            ),
        )

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def close(self) -> None:
        self._manager.close()

    def _write_manifest(self, step: int) -> None:
        step_dir = self.directory / str(step)
        manifest = {"step": step, "files": {name: _digest(step_dir / name) for name in _files(step_dir)}}
        _write_atomic(step_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")

    def verify(self, step: int) -> str | None:
        """None if step ``step``'s files match its manifest, else what is wrong (naming the file)."""
        step_dir = self.directory / str(step)
        try:
            manifest = json.loads((step_dir / MANIFEST).read_text())["files"]
        except FileNotFoundError:
            return f"no digest manifest {MANIFEST} (interrupted before it was written, or an older run)"
        except (json.JSONDecodeError, KeyError) as e:
            return f"{MANIFEST} is unreadable ({e})"
        files = _files(step_dir)
        for name in sorted(set(manifest) - set(files)):
            return f"{name} is missing"
        for name in sorted(set(files) - set(manifest)):
            return f"{name} is not in the manifest"
        for name, want in manifest.items():
            if _digest(step_dir / name) != want:
                return f"{name} does not match its SHA-256 digest"
        return None

    def newest_intact(self) -> int | None:
        """The newest step whose files match its manifest. Damaged newer steps are moved to
        ``<workdir>/checkpoints.corrupt/`` with a warning (so the resumed run can save those steps
        again); if no step is intact none is moved and CheckpointError says why for each."""
        steps = self.steps()
        if not steps:
            return None
        problems = {s: self.verify(s) for s in reversed(steps)}
        if not any((self.directory / str(s) / MANIFEST).exists() for s in steps):
            logging.warning(
                "%s: checkpoints without digest manifests (an older run): restoring unverified", self.directory
            )
            return steps[-1]
        intact = [s for s, p in problems.items() if p is None]
        if not intact:
            detail = "; ".join(f"step {s}: {p}" for s, p in problems.items())
            raise CheckpointError(
                f"no intact checkpoint in {self.directory} ({detail}). Move the directory aside to start the run "
                "over, or restore a backup."
            )
        good = intact[0]
        aside = self.workdir / "checkpoints.corrupt"
        for s in (s for s in steps if s > good):
            target = aside / f"{s}-{time.strftime('%Y%m%d-%H%M%S')}"
            logging.warning(
                "checkpoint step %d in %s is damaged (%s); falling back to step %d. Moved to %s.",
                s, self.directory, problems[s], good, target,
            )  # fmt: skip
            if self.chief:
                aside.mkdir(exist_ok=True)
                shutil.move(self.directory / str(s), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("qlora_jax: corrupt checkpoints moved aside")
        self._manager.reload()
        return good

    def restore(self, step: int, state_abstract):
        """``(state, meta)`` of ``step``, restored into ``state_abstract``'s shapes and shardings."""
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(state_abstract), meta=ocp.args.JsonRestore()),
            )
        except Exception as e:
            raise CheckpointError(
                f"restoring checkpoint step {step} from {self.directory} failed: {_os_error(e)}"
            ) from e
        return restored["state"], restored["meta"]

    def save(self, step: int, state, meta: dict) -> None:
        """Write step ``step`` and its manifest, or raise CheckpointError and leave nothing partial.

        Orbax logs each failing write thread's traceback; those go to ``<workdir>/checkpoint_error.log``
        instead of the console, which gets the one message of the CheckpointError.
        """
        held: list[logging.LogRecord] = []
        try:
            with _held_orbax_errors(held):
                self._manager.save(
                    step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
                )
                if self.chief:
                    self._write_manifest(step)
        except Exception as e:
            # writer threads of the failed save may still report it after this returns: keep those out too
            late = _HoldOrbaxErrors(held, about=f"{self.directory}{os.sep}{step}.orbax-checkpoint-tmp")
            for name in _LOGGERS:
                logging.getLogger(name).addFilter(late)
            self._remove_partial(step)
            last = [s for s in self.steps() if s != step]
            kept = f"the last intact checkpoint is step {last[-1]}" if last else "no checkpoint has been written yet"
            log = self._write_error_log(e, held)
            raise CheckpointError(
                f"saving checkpoint step {step} to {self.directory} failed: {_os_error(e)}; {kept}. Free space (or "
                f"fix the permissions) and re-run the same command to resume.{log}"
            ) from e

    def _write_error_log(self, error: BaseException, held: list[logging.LogRecord]) -> str:
        path = self.workdir / "checkpoint_error.log"
        lines = [logging.Formatter().format(r) for r in held]
        lines.append("".join(traceback.format_exception(error)))
        try:
            path.write_text("\n".join(lines) + "\n")
        except OSError:  # the disk that failed the save may refuse this too
            return ""
        return f" Details: {path}."

    def _remove_partial(self, step: int) -> None:
        if not self.chief:
            return
        for p in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        step_dir = self.directory / str(step)
        if step_dir.exists() and not (step_dir / MANIFEST).exists():
            shutil.rmtree(step_dir, ignore_errors=True)
        with contextlib.suppress(Exception):
            self._manager.reload()
