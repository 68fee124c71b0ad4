from __future__ import annotations

import pytest
import torch

from gradinv.data import load_dataset


@pytest.fixture(scope="session", autouse=True)
def _generator_cache(tmp_path_factory):
    """GIAS's bundled generator is trained once per test session into a temporary cache, never into ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GRADINV_CACHE", str(tmp_path_factory.mktemp("gradinv-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def photos32():
    return load_dataset("photos", image_size=32, channels=3)


@pytest.fixture(scope="session")
def digits32():
    return load_dataset("digits", image_size=32, channels=3)


@pytest.fixture(scope="session")
def deficient_chain():
    """A factory of small conv chains for 16x16 inputs whose middle conv is rank-deficient for R-GAP: its input
    has 16 x 8 x 8 = 1,024 values but its 4 output channels give 256 forward and 576 gradient constraints."""
    from torch import nn

    def build(activation: str = "sigmoid", *, seed: int = 0) -> nn.Module:
        act = nn.Sigmoid if activation == "sigmoid" else lambda: nn.LeakyReLU(0.2)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False),
                act(),
                nn.Conv2d(16, 4, 3, padding=1, bias=False),
                act(),
                nn.Flatten(),
                nn.Linear(4 * 8 * 8, 10),
            )

    return build
