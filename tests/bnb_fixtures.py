"""Reader for the bitsandbytes golden fixtures (tests/fixtures/bnb_4bit.npz)."""

import json
import pathlib

import ml_dtypes
import numpy as np

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


class BnbFixtures:
    """tests/fixtures/bnb_4bit.npz, written by tests/fixtures/make_bnb_fixtures.py."""

    def __init__(self, path: pathlib.Path):
        self._data = np.load(path)
        self.cases = json.loads(self._data["meta/cases"].tobytes())
        self.versions = json.loads(self._data["meta/versions"].tobytes())

    def __getitem__(self, key: str) -> np.ndarray:
        return self._data[key]

    def array(self, key: str, dtype_name: str) -> np.ndarray:
        """An array in its original dtype (bfloat16 is stored as uint16 bits)."""
        a = self._data[key]
        return a.view(ml_dtypes.bfloat16) if dtype_name == "bfloat16" else a

    def state_dict(self, tag: str) -> dict[str, np.ndarray]:
        prefix = f"statedict/{tag}/key/"
        return {k[len(prefix) :]: self._data[k] for k in self._data.files if k.startswith(prefix)}
