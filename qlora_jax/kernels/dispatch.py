"""Which kernel runs: a :class:`Dispatch` value passed down, resolved from a committed, measured table.

A :class:`Dispatch` names the dequantize implementation and the qmatmul implementation per range
of M (rows of activations). It is frozen and hashable, so it is a static argument: a ``jax.jit``
static arg, a flax module attribute. :func:`qlora_jax.kernels.qmatmul` and
:func:`qlora_jax.kernels.dequantize` take one as ``impl=`` and read nothing else to choose; the
string ``impl="auto"`` is shorthand for ``impl=for_device()``, resolved when it is called (at
trace time under ``jit``).

:func:`for_device` builds the Dispatch for a device from ``dispatch.json`` (beside this file), which
maps a ``jax.Device.device_kind`` to what a GPU run of ``tools/gpu_check.sh`` measured fastest there,
and only after its compiled kernel tests passed (``experiments/dispatch_table.py`` writes the entry)::

    {"devices": {"NVIDIA H200": {
        "dequantize": "pallas",                         # or "mosaic_gpu", "xla"
        "qmatmul": [[16, "pallas_decode"], [null, "pallas_dequant"]],   # (max M, impl), M ascending
        "measured": {"date": "...", "commit": "...", "source": "bench_kernels device time"}}}}

A kind without an entry, and every non-GPU device, gets :data:`XLA`. To try a freshly measured
entry before committing it, pass its table: ``for_device(table={"devices": {...}})``. The module
holds no mutable state: the committed file is read once and never changes in a process.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import jax

from qlora_jax.kernels._common import DECODE_MAX_M

TABLE_FILE = pathlib.Path(__file__).with_name("dispatch.json")
QMATMUL_IMPLS = ("pallas", "pallas_decode", "pallas_dequant", "xla")
DEQUANTIZE_IMPLS = ("pallas", "mosaic_gpu", "xla")
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def _check_rules(what: str, dequantize, rules) -> None:
    if dequantize not in DEQUANTIZE_IMPLS:
        raise ValueError(f"{what}.dequantize must be one of {DEQUANTIZE_IMPLS}; got {dequantize!r}")
    bounds = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, list | tuple) and len(rule) == 2 and rule[1] in QMATMUL_IMPLS):
            raise ValueError(f"{what}.qmatmul[{i}] must be [max_m or null, one of {QMATMUL_IMPLS}]; got {rule!r}")
        # bool is an int to isinstance, and True would read as max_m 1
        if rule[0] is not None and (not isinstance(rule[0], int) or isinstance(rule[0], bool) or rule[0] < 1):
            raise ValueError(f"{what}.qmatmul[{i}]: max_m must be a positive int or null; got {rule[0]!r}")
        if rule[1] == "pallas_decode" and (rule[0] is None or rule[0] > DECODE_MAX_M):
            raise ValueError(f"{what}.qmatmul[{i}]: pallas_decode takes M <= {DECODE_MAX_M}; got max_m {rule[0]!r}")
        bounds.append(rule[0])
    finite = [b for b in bounds if b is not None]
    if finite != sorted(finite) or None in bounds[:-1]:
        raise ValueError(f"{what}.qmatmul: max_m must ascend, with null (no bound) only last; got {bounds}")


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """The kernels to run: a static choice, checked when built.

    Attributes:
      dequantize: one of :data:`DEQUANTIZE_IMPLS`.
      qmatmul: ``(max_m, impl)`` rules, ``max_m`` ascending, the last may be ``None`` (no bound);
        ``impl`` one of :data:`QMATMUL_IMPLS`. An M past every bound runs ``"xla"``. Lists are
        accepted and stored as tuples (the value must hash).
    """

    dequantize: str = "xla"
    qmatmul: tuple[tuple[int | None, str], ...] = ()

    def __post_init__(self):
        rules = self.qmatmul
        if not isinstance(rules, list | tuple):
            raise ValueError(f"Dispatch.qmatmul must be a sequence of (max_m, impl) rules; got {rules!r}")
        _check_rules("Dispatch", self.dequantize, rules)
        object.__setattr__(self, "qmatmul", tuple((max_m, impl) for max_m, impl in rules))

    @classmethod
    def xla(cls) -> Dispatch:
        """The XLA path for everything (:data:`XLA`)."""
        return XLA

    @classmethod
    def from_entry(cls, entry: dict) -> Dispatch:
        """From one device's entry of the table (``{"dequantize": ..., "qmatmul": [...]}``)."""
        return cls(entry.get("dequantize", "xla"), tuple(tuple(rule) for rule in entry.get("qmatmul", ())))

    def qmatmul_impl(self, m: int) -> str:
        """The qmatmul implementation for ``m`` rows of activations (before shape support is checked)."""
        for max_m, impl in self.qmatmul:
            if max_m is None or m <= max_m:
                return impl
        return "xla"


XLA = Dispatch()


def check_entry(kind: str, entry: dict, where: str = str(TABLE_FILE)) -> None:
    """Refuse an entry naming an unknown impl or with M bounds out of order, naming the device kind."""
    _check_rules(f"{where}: devices[{kind!r}]", entry.get("dequantize", "xla"), entry.get("qmatmul", ()))


@functools.cache
def _committed() -> dict:
    table = json.loads(TABLE_FILE.read_text())
    for kind, entry in table.get("devices", {}).items():
        check_entry(kind, entry)
    return table


def for_device(device: jax.Device | None = None, table: dict | None = None) -> Dispatch:
    """The :class:`Dispatch` for ``device`` (default ``jax.devices()[0]``) from ``table``.

    Args:
      device: anything with ``platform`` and ``device_kind`` (a ``jax.Device``). A non-GPU
        platform gets :data:`XLA` whatever the table says: the kernels are GPU kernels.
      table: ``{"devices": {kind: entry}}``, every entry checked like the file's; default the
        committed ``dispatch.json``.
    """
    if table is None:
        table = _committed()
    else:
        for kind, entry in table.get("devices", {}).items():
            check_entry(kind, entry, where="for_device(table=...)")
    if device is None:
        device = jax.devices()[0]
    if device.platform not in _GPU_PLATFORMS:
        return XLA
    entry = table.get("devices", {}).get(device.device_kind)
    return XLA if entry is None else Dispatch.from_entry(entry)
