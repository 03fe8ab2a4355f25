"""workdir.py in-process: the lock's rules, checkpoint digests, and a failed save's message and
clean-up (an ENOSPC raised into orbax's save, as a full disk raises it)."""

import errno
import json
import os
import socket

import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.train import workdir as wd


def test_a_held_lock_refuses_a_second_holder_and_is_released(tmp_path):
    with wd.WorkdirLock(tmp_path):
        record = json.loads((tmp_path / ".lock").read_text())
        assert (record["pid"], record["host"]) == (os.getpid(), socket.gethostname())
        with pytest.raises(wd.WorkdirBusy, match=rf"is in use by another run: pid {os.getpid()} on host"):
            wd.WorkdirLock(tmp_path).__enter__()  # flock conflicts across open files, in one process too
    assert (tmp_path / ".lock").read_text() == ""
    with wd.WorkdirLock(tmp_path):  # free again
        pass


def test_without_flock_the_pid_record_decides(tmp_path, monkeypatch, caplog):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(wd.fcntl, "flock", no_flock)
    host = socket.gethostname()
    (tmp_path / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": host, "started": "t"}))  # alive
    with pytest.raises(wd.WorkdirBusy, match=rf"in use by another run: pid {os.getppid()} on host {host}"):
        wd.WorkdirLock(tmp_path).__enter__()
    (tmp_path / ".lock").write_text(json.dumps({"pid": 2**22 + 7, "host": host, "started": "t"}))  # no such pid
    with caplog.at_level("WARNING"), wd.WorkdirLock(tmp_path):
        pass
    assert "no flock here ([Errno 37] No locks available)" in caplog.text
    assert f"taking over the stale lock of pid {2**22 + 7}" in caplog.text


def _state(v=1.0):
    return {"a": jnp.full((300,), v, jnp.float32), "b": jnp.arange(7, dtype=jnp.int32)}


def test_digests_name_what_is_damaged(tmp_path):
    ckpt = wd.Checkpoints(tmp_path)
    ckpt.save(1, _state(), {"data": {"epoch": 0, "index": 1}})
    ckpt.save(2, _state(2.0), {"data": {"epoch": 0, "index": 2}})
    assert ckpt.verify(1) is None and ckpt.verify(2) is None
    step2 = tmp_path / "checkpoints" / "2"
    (step2 / "stray.bin").write_bytes(b"x")
    assert ckpt.verify(2) == "stray.bin is not in the manifest"
    (step2 / "stray.bin").unlink()
    meta = step2 / "meta" / "metadata"
    meta.unlink()
    assert ckpt.verify(2) == "meta/metadata is missing"
    (step2 / wd.MANIFEST).unlink()
    assert "no digest manifest" in ckpt.verify(2)
    assert ckpt.newest_intact() == 1
    assert ckpt.steps() == [1]  # step 2 moved aside, so it can be written again
    state, meta = ckpt.restore(1, _state())
    np.testing.assert_array_equal(np.asarray(state["a"]), 1.0)
    assert meta == {"data": {"epoch": 0, "index": 1}}
    ckpt.close()


def test_a_full_disk_at_save_names_path_errno_and_the_last_intact_step(tmp_path, monkeypatch):
    ckpt = wd.Checkpoints(tmp_path)
    ckpt.save(2, _state(), {"data": {}})
    real_save = ckpt._manager.save

    def full_disk(step, args):
        (tmp_path / "checkpoints" / f"{step}.orbax-checkpoint-tmp").mkdir()  # what orbax leaves behind
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt._manager, "save", full_disk)
    with pytest.raises(wd.CheckpointError) as e:
        ckpt.save(4, _state(), {"data": {}})
    assert str(e.value).startswith(
        f"saving checkpoint step 4 to {tmp_path / 'checkpoints'} failed: [Errno 28] No space left on device; "
        "the last intact checkpoint is step 2."
    )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]  # nothing partial left
    assert "OSError: [Errno 28]" in (tmp_path / "checkpoint_error.log").read_text()
    monkeypatch.setattr(ckpt._manager, "save", real_save)
    ckpt.save(4, _state(4.0), {"data": {}})  # space again
    assert ckpt.newest_intact() == 4
    ckpt.close()


def test_tensorstore_errno_is_read_from_its_message():
    e = ValueError("OUT_OF_RANGE: Error writing ... Failed to write 8968 bytes: File too large [os_error_code='27']")
    assert wd._os_error(e) == "[Errno 27] File too large (EFBIG)"
