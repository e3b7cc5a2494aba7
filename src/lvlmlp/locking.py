"""Folder locks: one process at a time writes a run folder, an experiment or a judged run.

An exclusive fcntl lock on `FOLDER/.lvlmlp.lock` that names its holder; the kernel drops the locks of dead processes,
so a killed command never leaves a stale one.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lvlmlp.errors import LvlmlpError

LOCK_NAME = ".lvlmlp.lock"
_HELD_LOCKS: set[int] = set()  # descriptors of the locks this process holds


def forget_inherited_locks() -> None:
    # A forked child (a data-loader worker) shares the parent's lock descriptors, and an flock lives as long as any
    # of them: the child closes its copies (without unlocking), so that a SIGKILLed parent frees the run at once.
    for fd in _HELD_LOCKS:
        os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=forget_inherited_locks)


class FolderLock:
    """An exclusive fcntl lock on `folder/.lvlmlp.lock`, naming its holder; released on `release()` or when the
    process ends (the kernel drops fcntl locks of dead processes, so a killed run never leaves a stale lock)."""

    def __init__(self, folder: str | Path) -> None:
        self._fd: int | None = None
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise LvlmlpError(
                f"{self.folder}: in use by {holder}; wait for it to finish (or stop it) and re-run"
            ) from None
        command = " ".join(["lvlmlp", *sys.argv[1:]]) if sys.argv else "lvlmlp"
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {now} ({command})\n".encode(), 0)
        self._fd = fd
        _HELD_LOCKS.add(fd)

    def release(self) -> None:
        if self._fd is not None and self._fd in _HELD_LOCKS:  # not in a forked child: its copy is closed
            _HELD_LOCKS.discard(self._fd)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        self.release()


@contextmanager
def locked_folder(folder: str | Path) -> Iterator[FolderLock]:
    lock = FolderLock(folder)
    try:
        yield lock
    finally:
        lock.release()
