"""Shared pytest fixtures."""

import pytest
from bnb_fixtures import FIXTURES, BnbFixtures


@pytest.fixture(scope="session")
def bnb() -> BnbFixtures:
    return BnbFixtures(FIXTURES / "bnb_4bit.npz")


@pytest.fixture
def fresh_rng():
    """A generator seeded afresh each run; the seed is printed (shown by pytest on failure)."""
    import numpy as np

    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"fresh_rng seed = {seed}")
    return np.random.default_rng(seed)
