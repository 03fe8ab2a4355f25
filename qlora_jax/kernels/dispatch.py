"""Which kernel ``impl="auto"`` runs: a committed table per device kind, measured, not module globals.

``dispatch.json`` (beside this file) maps a ``jax.Device.device_kind`` to what a GPU run of
``tools/gpu_check.sh`` measured fastest there, and only after its compiled kernel tests passed
(``experiments/dispatch_table.py`` writes the entry)::

    {"devices": {"NVIDIA H200": {
        "dequantize": "pallas",                         # or "mosaic_gpu", "xla"
        "qmatmul": [[16, "pallas_decode"], [null, "pallas_dequant"]],   # (max M, impl), M ascending
        "measured": {"date": "...", "commit": "...", "source": "bench_kernels device time"}}}}

A kind without an entry, and every non-GPU backend, runs the XLA path. :func:`override` swaps
the table (tests; trying a freshly measured entry before committing it).
"""

from __future__ import annotations

import contextlib
import functools
import json
import pathlib

import jax

TABLE_FILE = pathlib.Path(__file__).with_name("dispatch.json")
QMATMUL_IMPLS = ("pallas", "pallas_decode", "pallas_dequant", "xla")
DECODE_MAX_M = 16  # qlora_jax.kernels.decode.MAX_M (not imported: the kernels import this module)
DEQUANTIZE_IMPLS = ("pallas", "mosaic_gpu", "xla")
_override: list[dict] = []


def check_entry(kind: str, entry: dict, where: str = str(TABLE_FILE)) -> None:
    """Refuse an entry naming an unknown impl or with M bounds out of order, naming the device kind."""
    what = f"{where}: devices[{kind!r}]"
    if entry.get("dequantize", "xla") not in DEQUANTIZE_IMPLS:
        raise ValueError(f"{what}.dequantize must be one of {DEQUANTIZE_IMPLS}; got {entry.get('dequantize')!r}")
    bounds = []
    for i, rule in enumerate(entry.get("qmatmul", ())):
        if not (isinstance(rule, list | tuple) and len(rule) == 2 and rule[1] in QMATMUL_IMPLS):
            raise ValueError(f"{what}.qmatmul[{i}] must be [max_m or null, one of {QMATMUL_IMPLS}]; got {rule!r}")
        if rule[0] is not None and (not isinstance(rule[0], int) or rule[0] < 1):
            raise ValueError(f"{what}.qmatmul[{i}]: max_m must be a positive int or null; got {rule[0]!r}")
        if rule[1] == "pallas_decode" and (rule[0] is None or rule[0] > DECODE_MAX_M):
            raise ValueError(f"{what}.qmatmul[{i}]: pallas_decode takes M <= {DECODE_MAX_M}; got max_m {rule[0]!r}")
        bounds.append(rule[0])
    finite = [b for b in bounds if b is not None]
    if finite != sorted(finite) or None in bounds[:-1]:
        raise ValueError(f"{what}.qmatmul: max_m must ascend, with null (no bound) only last; got {bounds}")


@functools.cache
def _committed() -> dict:
    table = json.loads(TABLE_FILE.read_text())
    for kind, entry in table.get("devices", {}).items():
        check_entry(kind, entry)
    return table


def table() -> dict:
    """The table in use: an :func:`override`'s, else the committed ``dispatch.json``."""
    return _override[-1] if _override else _committed()


@contextlib.contextmanager
def override(new_table: dict):
    """Use ``new_table`` (``{"devices": {...}}``, checked like the file) inside the block."""
    for kind, entry in new_table.get("devices", {}).items():
        check_entry(kind, entry, where="dispatch.override")
    _override.append(new_table)
    try:
        yield
    finally:
        _override.pop()


def _entry() -> dict | None:
    if jax.default_backend() != "gpu":
        return None
    return table().get("devices", {}).get(jax.devices()[0].device_kind)


def dequantize_impl() -> str:
    """One of DEQUANTIZE_IMPLS: the dequantize ``impl="auto"`` runs on this device."""
    entry = _entry()
    return entry.get("dequantize", "xla") if entry else "xla"


def qmatmul_impl(m: int) -> str:
    """The qmatmul ``impl="auto"`` runs for ``m`` rows of activations on this device."""
    entry = _entry()
    for max_m, impl in (entry or {}).get("qmatmul", ()):
        if max_m is None or m <= max_m:
            return impl
    return "xla"
