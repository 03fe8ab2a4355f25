"""A run's metrics writer: ``metrics.jsonl`` and TensorBoard event files, on process 0 only.

On a resume the JSONL keeps only the rows up to the restored step (a killed run may have logged
past its last checkpoint), and TensorBoard purges the events after it, so the logs of a resumed
run are the logs of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import pathlib

from tensorboardX import SummaryWriter

from qlora_jax.train.workdir import write_failed


def read_metrics(metrics_file: pathlib.Path, upto: int) -> list[dict]:
    """The rows of ``metrics.jsonl`` up to step ``upto``; a line cut short (a full disk, a kill
    mid-write) is dropped."""
    rows = []
    if metrics_file.exists():
        for line in metrics_file.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                logging.warning("%s: dropped a partial line %r", metrics_file, line[:80])
                continue
            if row["step"] <= upto:
                rows.append(row)
    return rows


class MetricsWriter:
    """Rows to ``workdir/metrics.jsonl`` and ``workdir/tensorboard`` (process 0; others write nothing).

    ``start``: the step the run (re)starts from; ``fresh``: the run starts over (no row of before
    stays). ``rows`` are the rows kept from before. A write that fails (a full disk) raises
    :func:`~qlora_jax.train.workdir.write_failed`'s error, naming the last intact checkpoint.
    """

    def __init__(self, workdir: pathlib.Path, chief: bool, start: int, fresh: bool, ckpt=None):
        self.file = workdir / "metrics.jsonl"
        self.chief, self.ckpt, self.workdir = chief, ckpt, workdir
        self.rows = read_metrics(self.file, start) if chief and not fresh else []
        self.tensorboard = None
        if chief:
            self.file.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
            self.tensorboard = SummaryWriter(str(workdir / "tensorboard"), purge_step=0 if fresh else start + 1)

    def write(self, row: dict) -> None:
        if not self.chief:
            return
        try:
            with self.file.open("a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise write_failed(self.file, e, self.ckpt) from e
        for k, v in row.items():
            if k != "step":
                self.tensorboard.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tensorboard is None:
            return
        try:
            self.tensorboard.close()
        except OSError as e:  # a full disk: keep the error that stopped the run, if any, in front
            logging.warning("%s: the TensorBoard event file could not be written: %s", self.workdir, e)
        self.tensorboard = None
