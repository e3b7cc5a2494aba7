"""The data loader's faults: a worker killed mid-run, Ctrl-C at the moment a worker is forked.

Each command runs in a forked copy of this process (as tests/test_extract.py's `_kill_midway` does: torch and the
model code are imported already), in a process group of its own, so that a signal sent to its group reaches it and
its workers as a terminal's Ctrl-C would, and never pytest.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from lvlmlp import open_run
from lvlmlp.cli import main
from tests.extraction.test_extract import _alive, make_manifest

INTERRUPTED = "lvlmlp: interrupted; what was committed is kept, the same command resumes from there"


def _spawn(argv: list[str], stderr: Path, setup: Callable[[], None] | None = None) -> int:
    """Fork a copy of this process that runs `lvlmlp ARGV` (stderr to the file) after `setup()`; returns its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setpgid(0, 0)
            signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, not pytest's handler
            null = os.open(os.devnull, os.O_RDWR)
            err = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            for fd, target in ((0, null), (1, null), (2, err)):
                os.dup2(target, fd)
            sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
            if setup is not None:
                setup()
            code = main(argv)
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
    return pid


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _wait(pid: int, seconds: float) -> int | None:
    """The exit code of `pid` within `seconds`, or None (it is then killed with its process group)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.killpg(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def _no_workers_left(workers: list[int]) -> None:
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    lingering = [p for p in workers if _alive(p)]
    for p in lingering:
        os.kill(p, signal.SIGKILL)
    assert not lingering, "data-loader workers kept running"


def test_a_killed_worker_ends_extraction_within_a_bound_and_a_rerun_completes(tiny_ckpt, tmp_path):
    """kill -9 of the only worker after the first shard: the command stops within seconds with a one-line error
    (it used to block forever reading the half-written batch the worker left in the pipe), the committed shard is
    kept, and the same command resumes to the rows of an uninterrupted run. Batches of 8 rows (75 kB) overfill the
    pipe, so the worker is always caught mid-write."""
    ckpt = tiny_ckpt("llava")
    manifest = make_manifest(tmp_path, 48, seed=2)
    base = ["extract", "--model", str(ckpt), "--data", str(manifest), "--batch-size", "8", "--shard-size", "8",
            "--device", "cpu", "--store-dtype", "float32", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "clean"), "--workers", "0"]) == 0
    clean = open_run(tmp_path / "clean")

    out, stderr = tmp_path / "killed", tmp_path / "stderr.txt"
    pid = _spawn([*base, "--out", str(out), "--workers", "1"], stderr)
    deadline = time.monotonic() + 120
    while not list((out / "shards").glob("*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.005)
    workers = _children(pid)
    assert workers, "no data-loader worker was running"
    os.kill(workers[0], signal.SIGKILL)
    code = _wait(pid, 30)
    assert code is not None, "extraction hung after its data-loader worker was killed"
    lines = stderr.read_text().strip().splitlines()
    assert code == 2 and lines[-1] == (
        "lvlmlp: error: extract: a data-loader process died (killed by signal SIGKILL), perhaps out of memory; "
        "re-run to resume, with --workers 0 to prepare batches in this process"), lines
    committed = sorted((out / "shards").glob("*.safetensors"))
    assert committed and not (out / "logits.npy").exists()
    before = {p.name: p.read_bytes() for p in committed}
    assert main([*base, "--out", str(out), "--workers", "1"]) == 0
    resumed = open_run(out)
    assert resumed.ids == clean.ids and resumed.meta == clean.meta
    np.testing.assert_allclose(resumed.logits(0), clean.logits(0), atol=1e-5, rtol=0)
    assert all((out / "shards" / name).read_bytes() == data for name, data in before.items()
               if (out / "shards" / name).exists())  # committed shards untouched until the final copy


def _interrupt_at_fork(where: str) -> Callable[[], None]:
    """A setup that makes every fork of the command deliver Ctrl-C (SIGINT to the process group, as a terminal
    does) at the moment the worker is forked: just before the fork, or right after it in the parent, or right
    after it in the new worker (before the worker could set its own signal handling)."""

    def setup() -> None:
        real_fork = os.fork

        def fork() -> int:
            if where == "before":
                os.killpg(0, signal.SIGINT)
            pid = real_fork()
            if (pid == 0) == (where == "child") and where != "before":
                os.killpg(0, signal.SIGINT)
            return pid

        os.fork = fork

    return setup


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ctrl_c_while_workers_are_forked_always_exits_130(tiny_ckpt, tmp_path, workers):
    """Ctrl-C at any moment of a worker's fork ends the command with the interrupted line and exit 130, every
    time (it was swallowed in some tries: tracebacks from the workers and exit 0), and leaves no worker running."""
    ckpt = tiny_ckpt("llava")
    manifest = make_manifest(tmp_path, 8, seed=3)
    base = ["extract", "--model", str(ckpt), "--data", str(manifest), "--batch-size", "2", "--device", "cpu",
            "--no-progress", "--workers", workers]
    for attempt, where in enumerate(["before", "parent", "child"] * 3):
        stderr = tmp_path / f"stderr{attempt}.txt"
        pid = _spawn([*base, "--out", str(tmp_path / f"run{attempt}")], stderr, _interrupt_at_fork(where))
        code = _wait(pid, 60)
        text = stderr.read_text()
        assert code == 130, (where, code, text)
        assert text.strip().splitlines()[-1] == INTERRUPTED and "Traceback" not in text, (where, text)


def test_a_worker_killed_while_holding_the_chunk_counter_stops_the_run_not_hangs():
    """The shared chunk counter's lock, held by a worker killed in the middle of a claim, is never released: the
    main process's claim then raises the worker's death within seconds (a worker's claim gives up when told to)."""
    import multiprocessing as mp

    from lvlmlp.errors import LvlmlpError
    from lvlmlp.extraction.loader import _claim, _raise_if_dead

    ctx = mp.get_context("fork")
    claimed = ctx.Value("q", 0)
    assert _claim(claimed, 4) == 0 and _claim(claimed, 1) is None  # the counter itself

    def claim_and_die() -> None:
        claimed.get_lock().acquire()
        os.kill(os.getpid(), signal.SIGKILL)

    proc = ctx.Process(target=claim_and_die)
    proc.start()
    proc.join()
    started = time.monotonic()
    with pytest.raises(LvlmlpError, match=r"a data-loader process died \(killed by signal SIGKILL\).*--workers 0"):
        _claim(claimed, 4, lambda: _raise_if_dead([proc]))
    assert time.monotonic() - started < 5
    assert _claim(claimed, 4, lambda: True) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pipe sizes are Linux's")
def test_a_workers_pipe_holds_a_whole_batch_without_a_reader():
    """A batch bigger than a default pipe (64 KiB; the tiny LLaVA's batch of 8 is ~80 KB) is written whole with no
    reader waiting: the worker's send returns at once instead of waiting for the main process to drain it."""
    import fcntl

    from lvlmlp.extraction.loader import _widen_pipe

    with open("/proc/sys/fs/pipe-max-size") as f:
        limit = int(f.read())
    r, w = os.pipe()
    try:
        os.set_blocking(w, False)
        batch = b"x" * (limit - 4096)
        with pytest.raises(BlockingIOError):  # as it was: the default pipe fills at 64 KiB
            while True:
                os.write(w, batch[:65536])
        os.read(r, limit)  # drained again
        _widen_pipe(w)
        assert fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) == limit
        assert os.write(w, batch) == len(batch)  # one write, nobody reading
        assert os.read(r, limit) == batch
    finally:
        os.close(r)
        os.close(w)
