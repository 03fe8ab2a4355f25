"""Shared pytest fixtures."""

import pytest
from bnb_fixtures import FIXTURES, BnbFixtures


@pytest.fixture(scope="session")
def bnb() -> BnbFixtures:
    return BnbFixtures(FIXTURES / "bnb_4bit.npz")
