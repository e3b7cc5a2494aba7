"""Shared test set-up: one torch thread (2 threads make tiny ops ~10x slower here) and cached tiny checkpoints.

LVLMLP_TEST_THREADS=2 runs the suite with 2 torch threads instead: other kernels, as another CPU would choose, so
that a test comparing floats bit for bit across shapes or code paths shows up here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Forced, not defaulted: a test must never reach the network, whatever the caller's environment says.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

_THREADS_BEFORE = torch.get_num_threads()
torch.set_num_threads(int(os.environ.get("LVLMLP_TEST_THREADS", "1")))


def pytest_unconfigure(config: pytest.Config) -> None:
    """Give torch its thread count back (pytest run in-process, e.g. by mutmut, leaves the caller as it was)."""
    torch.set_num_threads(_THREADS_BEFORE)


SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory):
    """`tiny_ckpt("llava")` -> path of a tiny real checkpoint of that family, built once per test session."""
    from lvlmlp.testing import tiny_model

    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("tiny_models")

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = tiny_model(family, root / family)
        return cache[family]

    return get
