from __future__ import annotations

import pytest

from gradinv.data import load_dataset


@pytest.fixture(scope="session")
def photos32():
    return load_dataset("photos", image_size=32, channels=3)


@pytest.fixture(scope="session")
def digits32():
    return load_dataset("digits", image_size=32, channels=3)
