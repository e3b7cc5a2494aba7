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


@pytest.fixture(autouse=True)
def _process_state_restored():
    """What a test (or a command it runs in-process) changes for the whole process is put back after it, so that no
    test depends on its neighbours (default order, `--shuffle-seed` orders, xdist workers): torch's thread count (`lvlmlp demo
    --threads N` sets it for the process), transformers' progress-bar switch and verbosity, the root logger's level
    and handlers (`lvlmlp.cli.main` calls logging.basicConfig), and the working directory."""
    import logging
    import sys

    threads, cwd = torch.get_num_threads(), os.getcwd()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    hf = sys.modules.get("transformers.utils.logging")
    hf_state = (hf.is_progress_bar_enabled(), hf.get_verbosity()) if hf else None
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if os.getcwd() != cwd:
        os.chdir(cwd)
    root.setLevel(level)
    for handler in root.handlers[:]:
        if handler not in handlers and type(handler).__module__.startswith("logging"):  # not pytest's own
            root.removeHandler(handler)
    if hf_state is not None:  # (first imported by this test: its import-time setting is the one every later test sees)
        bars, verbosity = hf_state
        if hf.is_progress_bar_enabled() != bars:
            (hf.enable_progress_bar if bars else hf.disable_progress_bar)()
        if hf.get_verbosity() != verbosity:
            hf.set_verbosity(verbosity)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Give torch its thread count back (pytest run in-process, e.g. by mutmut, leaves the caller as it was)."""
    torch.set_num_threads(_THREADS_BEFORE)


# `make test` runs the files on 2 workers (pytest-xdist, --dist loadfile --no-loadscope-reorder), without the README
# test (`make test-readme`). The slowest files are handed out first so that the short ones fill the gaps at the end;
# started last, a long file would add its whole time to the wall time (study/test_finetune.py, left unranked, once
# ran alone for the last 9 s). Ranked by the CPU time of their tests in a timed run (2026-12-02; Ray's replicas
# counted for extraction/test_ray_extract.py): about 55 s for test_ray_extract.py, 30 for demo/test_pipeline.py (with
# the demo checkpoint's tests, then a file of their own, ranked 4th), 13
# for study/test_experiment.py (with its run guards, then a file of their own, ranked 6th), 8 to 2 for the others
# listed; every other file takes under 2 s. Paths under tests/ (the layout mirrors src/lvlmlp/). Since the family
# checks of guided decoding and finetuning run every tiny family (2026-12-07), study/test_finetune.py,
# steering/test_guard.py and extraction/test_backend.py take about 14, 13 and 11 s and move up; with --vision of
# every family (about 50 s) extraction/test_backend.py is second.
TESTS = Path(__file__).resolve().parent
SLOWEST_FIRST = ("extraction/test_ray_extract.py", "extraction/test_backend.py", "demo/test_pipeline.py",
                 "study/test_finetune.py", "study/test_experiment.py", "steering/test_guard.py",
                 "judging/test_judge.py",
                 "extraction/test_loader.py", "extraction/test_extract.py",
                 "paper/test_paper_protocol.py", "e2e/test_faults.py", "serve/test_serve.py",
                 "study/test_report.py")
# (tests/test_conftest.py fails when a file named here is renamed or moved: it would lose its rank silently.)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--shuffle-seed", type=int, default=None, metavar="N",
                     help="run the test files in an order shuffled with seed N, and the tests inside each file too: a "
                          "test that passes only after its neighbours fails in some order (run in one process).")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The slowest files first, or, with --shuffle-seed N, every test in a seeded random order."""
    seed = config.getoption("--shuffle-seed")
    if seed is not None:
        import random

        # As pytest-randomly does (not installed here): the files in a random order, then the tests inside each
        # file; a file's tests stay together so that its module-scoped fixtures are built once.
        rng = random.Random(seed)
        by_file: dict[Path, list[pytest.Item]] = {}
        for item in items:
            by_file.setdefault(item.path, []).append(item)
        files = list(by_file.values())
        rng.shuffle(files)
        for tests in files:
            rng.shuffle(tests)
        items[:] = [item for tests in files for item in tests]
        return

    def rank(item: pytest.Item) -> int:
        name = item.path.relative_to(TESTS).as_posix() if item.path.is_relative_to(TESTS) else item.path.name
        return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)

    items.sort(key=rank)  # stable: collection order is kept within each rank


def pytest_report_header(config: pytest.Config) -> str | None:
    seed = config.getoption("--shuffle-seed")
    return None if seed is None else f"tests shuffled with --shuffle-seed {seed}"


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


@pytest.fixture
def screenshot(tmp_path: Path):
    """`screenshot(html_path, width, height)` -> PNG path of the page rendered by headless Chromium. Skips when
    Chromium is not installed (`make chromium` installs it; tests never install software); installed but writing
    nothing is a failure, not a skip: the page must render where Chromium exists."""
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium is not installed (`make chromium` installs it)")

    def shoot(page: Path, width: int, height: int) -> Path:
        shot = tmp_path / f"shot-{page.stem}.png"
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", f"--window-size={width},{height}",
               page.resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert shot.is_file(), f"Chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
        return shot

    return shoot


EXAMPLE_BACKEND = Path(__file__).resolve().parents[1] / "examples" / "minigpt4_backend.py"


@pytest.fixture(scope="session")
def minigpt4(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path, str]:
    """The backend-protocol example (examples/minigpt4_backend.py: a MiniGPT-4-shaped model from plain torch modules,
    registered with no Auto class): (its module, a tiny checkpoint folder of it, its `--backend` spec)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("minigpt4_backend", EXAMPLE_BACKEND)
    module = importlib.util.module_from_spec(spec)
    sys.modules["minigpt4_backend"] = module
    spec.loader.exec_module(module)
    ckpt = module.write_tiny(tmp_path_factory.mktemp("minigpt4") / "ckpt")
    return module, ckpt, f"{EXAMPLE_BACKEND}:MiniGPT4Backend"
