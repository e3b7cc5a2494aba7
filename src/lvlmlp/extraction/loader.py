"""Batches for the extractor: images loaded and run through the model's processor, inline or in worker processes.

Preparing a batch (decoding images, rendering prompts, the processor) is mostly Python, so it runs in forked worker
processes while the main process runs the model; threads would queue on the GIL. Batches come back in order, and
the main process prepares one itself whenever the workers are the bottleneck (see `prepared_batches`).
"""

from __future__ import annotations

import gc
import logging
import math
import mmap
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager, suppress
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # Windows: no fork, so no worker pipes to widen
    fcntl = None  # type: ignore[assignment]

from lvlmlp.data import image_check, load_image
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.png import png_pixels

if TYPE_CHECKING:
    from lvlmlp.extraction.backend import Backend

log = logging.getLogger("lvlmlp")


def usable_cores(cgroup: str | os.PathLike = "/sys/fs/cgroup") -> int:
    """The cores this process may run on: its CPU affinity, capped by a CPU quota of its cgroup (a container's
    `--cpus`), which torch's default of one thread per core ignores (64 threads on a 2-CPU quota of a 64-core host)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    root = Path(cgroup)
    try:  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"; v1: two files, quota -1 when unlimited
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota, period = ((root / "cpu" / name).read_text().strip() for name in ("cpu.cfs_quota_us",
                                                                                    "cpu.cfs_period_us"))
        except OSError:
            return cores
    try:
        share = int(quota) / int(period)
    except (ValueError, ZeroDivisionError):  # "max": no quota (a period of 0 is no quota either)
        return cores
    return max(1, min(cores, math.ceil(share))) if share > 0 else cores


@contextmanager
def cores_for_workers(backend: Backend, workers: int) -> Iterator[None]:
    """On the CPU, the model's threads take the cores the data-loader workers leave (all of them with no worker),
    never more than the caller's own setting (tests, `demo --threads`): oversubscribed, the model and the workers
    both slow down (torch's default of one thread per core halved extraction speed on 2 cores)."""
    before = torch.get_num_threads()
    if backend.device.type == "cpu":
        torch.set_num_threads(max(1, min(before, usable_cores() - workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


Prepared = tuple[list[dict], dict | None, list[tuple[str, str]]]  # rows that loaded, their batch, failures


def _prepare(backend: Backend, rows: list[dict], isolate: bool = True, new_tokens: int = 0) -> Prepared:
    """Load a batch's images (recording the rows that fail) and collate the rest into CPU tensors. A row the
    processor rejects (Qwen2-VL: an extreme aspect ratio) or that is longer than the model's context is recorded
    as failed, naming it, and the batch is collated without it. Workers pass `isolate=False`: a processor error
    there goes back to the main process, which prepares the batch again (and isolates the row) itself."""
    ok, images, failed = [], [], []
    check, tensors = image_check(backend), getattr(backend, "tensor_images", False)
    for row in rows:
        try:
            pixels = png_pixels(row["image"], check) if tensors else None
            images.append(load_image(row["image"], row["id"], check=check) if pixels is None else pixels)
            ok.append(row)
        except LvlmlpError as err:
            failed.append((row["id"], str(err)))
    if not ok:
        return ok, None, failed
    try:
        batch = backend.collate(images, [r["question"] for r in ok])
    except Exception:  # noqa: BLE001 - the processor's own exception types; each row is tried alone below
        if not isolate:
            raise
        keep = []
        for row, image in zip(ok, images):
            try:
                backend.collate([image], [row["question"]])
                keep.append((row, image))
            except Exception as err:  # noqa: BLE001
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                failed.append((row["id"], f"row {row['id']!r}: the processor rejects it ({first[:300]})"))
        if not keep:
            return [], None, failed
        ok, images = [r for r, _ in keep], [im for _, im in keep]
        batch = backend.collate(images, [r["question"] for r in ok])
    too_long = _too_long(backend, ok, batch, new_tokens)
    if too_long:
        failed.extend(too_long)
        bad = {row_id for row_id, _ in too_long}
        pairs = [(r, im) for r, im in zip(ok, images) if r["id"] not in bad]
        ok = [r for r, _ in pairs]
        batch = backend.collate([im for _, im in pairs], [r["question"] for r in ok]) if ok else None
    return ok, batch, failed


def _too_long(backend: Backend, rows: list[dict], batch: dict, new_tokens: int = 0) -> list[tuple[str, str]]:
    """Rows whose prompt (with image tokens) plus the `new_tokens` to generate exceeds the model's context: refused
    before the forward, which would otherwise take memory quadratic in the length (or run past its positions)."""
    limit = backend.max_length
    if limit is None or "attention_mask" not in batch:
        return []
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    plus = f" + {new_tokens} to generate" if new_tokens else ""
    return [(r["id"], f"row {r['id']!r}: the prompt is {n} tokens long{plus}, more than the model's maximum of "
                      f"{limit} (shorten the question)")
            for r, n in zip(rows, lengths) if n + new_tokens > limit]


def _claim(claimed: Any, n: int, stuck: Callable[[], bool] | None = None) -> int | None:
    """Take the next unprepared chunk index (shared by this process and the workers), or None when all are taken.

    A process killed in the middle of a claim leaves the counter's lock held forever: every second of waiting for
    it, `stuck()` says whether to give up (None is then returned; the main process's raises the worker's death)."""
    lock = claimed.get_lock()
    while not lock.acquire(timeout=1.0):
        if stuck is not None and stuck():
            return None
    try:
        k = claimed.get_obj().value
        if k >= n:
            return None
        claimed.get_obj().value = k + 1
        return k
    finally:
        lock.release()


# Batches of at least this many bytes go through buffers shared with the main process instead of the pipe: LLaVA-1.5's
# 336 px pixels are 10.8 MB a batch of 8, which pickled through a pipe cost the main process 7.5 ms to receive (two
# copies and a thousand reads), against 0.7 ms to copy out of a shared buffer. Smaller batches fit the widened pipe.
SHARED_MIN_BYTES = 1 << 20
SHARED_SLACK = 1.5  # a buffer holds this many times the first batch (padding and image sizes vary between batches)
_ALIGN = 64


def _layout(arrays: dict[str, np.ndarray]) -> tuple[list[tuple[str, str, tuple[int, ...], int]], int]:
    """(name, dtype, shape, offset) of each array packed one after another (64-byte aligned), and the bytes used."""
    out, end = [], 0
    for name, a in arrays.items():
        out.append((name, a.dtype.str, a.shape, end))
        end += -(-a.nbytes // _ALIGN) * _ALIGN
    return out, end


def _to_buffer(buf: mmap.mmap, arrays: dict[str, np.ndarray]) -> list[tuple[str, str, tuple[int, ...], int]] | None:
    """Copy `arrays` into the shared buffer; their layout, or None when they do not fit (then the pipe takes them)."""
    layout, end = _layout(arrays)
    if end > len(buf):
        return None
    for name, dtype, shape, offset in layout:
        np.ndarray(shape, dtype=dtype, buffer=buf, offset=offset)[...] = arrays[name]
    return layout


def _from_buffer(buf: mmap.mmap, layout: list[tuple[str, str, tuple[int, ...], int]]) -> dict[str, torch.Tensor]:
    """The arrays `_to_buffer` wrote, copied out (the worker reuses the buffer once the main process has them)."""
    return {name: torch.from_numpy(np.ndarray(shape, dtype=dtype, buffer=buf, offset=offset).copy())
            for name, dtype, shape, offset in layout}


def _worker(backend: Backend, chunks: list[list[dict]], claimed: Any, slots: Any, conn: Any, inherited: list[Any],
            new_tokens: int = 0, buffers: Sequence[mmap.mmap] = ()) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle; it stops us
    # The pipe ends forked into us that are not ours: the main process must see end-of-file on our pipe when we die
    # (not block on a half-written batch), and a send of ours must fail when the main process is gone.
    for other in inherited:
        other.close()
    torch.set_num_threads(1)
    parent = os.getppid()
    sent = 0
    while True:
        if not slots.acquire(timeout=1.0):
            if os.getppid() != parent:  # the main process was killed (SIGKILL, out of memory): do not linger
                return
            continue
        if (k := _claim(claimed, len(chunks), lambda: os.getppid() != parent)) is None:
            break
        start = time.perf_counter()
        try:
            rows, batch, failed = _prepare(backend, chunks[k], isolate=False, new_tokens=new_tokens)
            # numpy pickles by value through the pipe; torch tensors would go through one shared-memory file
            # descriptor each, which costs more than preparing the batch. Large batches go through our two shared
            # buffers in turn: with two batches at most in flight (`slots`) and the pipe read in order, the main
            # process has copied a buffer's batch out before we take that buffer again.
            arrays = None if batch is None else {n: t.numpy() for n, t in batch.items()}
            layout = _to_buffer(buffers[sent % 2], arrays) if buffers and arrays else None
            item = rows, (sent % 2, layout) if layout is not None else arrays, failed
        except Exception as err:  # noqa: BLE001 - the main process prepares this chunk again, raising it itself
            item = f"{type(err).__name__}: {err}"
        try:
            conn.send((k, item, time.perf_counter() - start))
        except OSError:  # BrokenPipeError: the main process stopped reading (it ended or was killed)
            return
        sent += 1
    conn.close()


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C while worker processes are forked, then deliver it: a KeyboardInterrupt raised inside fork's
    own callbacks (logging's lock handlers run there) is printed and ignored by Python, so the run went on and
    exited 0; and a forked worker must not unwind a copy of the main process's stack before it ignores SIGINT.
    Workers inherit the recording handler until they set their own. Only the main thread may set handlers."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # (None: a handler installed outside Python, which could not be put back)
        return
    caught: list[int] = []
    before = signal.signal(signal.SIGINT, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
        if caught:
            signal.raise_signal(signal.SIGINT)  # handled as the caller's handler says (KeyboardInterrupt)


def _died(proc: Any) -> LvlmlpError:
    """The error that stops the run when a data-loader worker died (it took its claimed batches with it)."""
    code = proc.exitcode
    how = f"exit code {code}"
    if code is not None and code < 0:
        try:
            how = f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
    return LvlmlpError(f"extract: a data-loader process died ({how}), perhaps out of memory; "
                       "re-run to resume, with --workers 0 to prepare batches in this process")


def _raise_if_dead(procs: list[Any]) -> bool:
    """For `_claim` in the main process: a worker that died (possibly holding the chunk counter) stops the run."""
    for proc in procs:
        if proc.pid is not None and proc.exitcode not in (None, 0):
            raise _died(proc)
    return False


def _widen_pipe(fd: int) -> None:
    """Give a worker's pipe the largest buffer an unprivileged process may (Linux: 1 MiB by default, not 64 KiB).

    A batch of the tiny test model is ~80 KB: through a 64 KiB pipe each one was a ping-pong in which the main
    process, reading, waited for the worker to be scheduled again to write the rest (1.3 s of 2,000 rows' 4.9 s
    on a loaded 2-core machine); with room for whole batches a worker's send returns at once and the main
    process's read finds the batch complete. Where the call is unknown or refused the pipe stays as it is."""
    if fcntl is None or not hasattr(fcntl, "F_SETPIPE_SZ"):
        return
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            size = int(f.read())
    except (OSError, ValueError):
        size = 1 << 20
    with suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)


class Started:
    """`prepared_batches(backend, chunks, ...)` run now up to its first batch, so that its workers are forked and
    at work before the caller goes on (`extract` then loads the model's weights). Iterating gives every batch in
    order; `close()` stops the workers, iterated or not."""

    def __init__(self, backend: Backend, chunks: list[list[dict]], workers: int, new_tokens: int = 0) -> None:
        self.chunks = chunks
        self._batches = prepared_batches(backend, chunks, workers, new_tokens)
        self._first = [next(self._batches)]

    def __iter__(self) -> Started:
        return self

    def __next__(self) -> Prepared:
        return self._first.pop() if self._first else next(self._batches)

    def close(self) -> None:
        self._batches.close()


def prepared_batches(backend: Backend, chunks: list[list[dict]], workers: int, new_tokens: int = 0
                     ) -> Generator[Prepared, None, None]:
    """Prepared batches in chunk order.

    Forked worker processes decode and collate upcoming batches while this process runs the model (image decoding
    and processors are mostly Python, so threads would queue on the GIL). Chunks are claimed from a shared counter;
    when the next batch is not ready and the workers are the bottleneck, this process claims and prepares one
    itself rather than wait, so on a small machine no core idles whichever side is slower, and the first batch
    does not wait for a worker to start. Fork shares the loaded backend copy-on-write instead of pickling it;
    without fork, or with workers=0, all is done inline. Batches of `SHARED_MIN_BYTES` or more come back through
    buffers shared with each worker rather than its pipe."""
    if workers <= 0 or "fork" not in mp.get_all_start_methods() or len(chunks) < 2:
        yield from (_prepare(backend, chunk, new_tokens=new_tokens) for chunk in chunks)
        return
    # The Rust tokenizer's thread pool would spin on the cores the workers need; processes are our parallelism.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ctx = mp.get_context("fork")
    workers = min(workers, len(chunks) - 1)
    claimed = ctx.Value("q", 0)  # chunks [0, claimed) are taken, by a worker or by this process
    # Per worker, at most two prepared batches not yet taken from its pipe: memory stays flat, and its two shared
    # buffers (if any) are never written while the main process still needs them.
    slots = [ctx.Semaphore(2) for _ in range(workers)]
    ready: dict[int, Prepared | None] = {}  # None: a worker failed on it
    # The first batch is ours (no worker has started yet): its size says whether batches go through shared buffers.
    k = _claim(claimed, len(chunks))
    ready[k] = first = _prepare(backend, chunks[k], new_tokens=new_tokens)
    nbytes = sum(t.numpy().nbytes for t in first[1].values()) if first[1] is not None else 0
    size = -(-int(nbytes * SHARED_SLACK) // mmap.PAGESIZE) * mmap.PAGESIZE if nbytes >= SHARED_MIN_BYTES else 0
    buffers = [[mmap.mmap(-1, size) for _ in range(2)] if size else [] for _ in range(workers)]  # shared on fork
    # A pipe per worker, whose writing end only that worker holds once started: a worker that dies (even halfway
    # through sending a batch) gives end-of-file here instead of a read that waits forever.
    pipes = [ctx.Pipe(duplex=False) for _ in range(workers)]
    ends = [end for pair in pipes for end in pair]
    for _, w in pipes:
        _widen_pipe(w.fileno())
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(backend, chunks, claimed, slots[i], w, [e for e in ends if e is not w], new_tokens,
                               buffers[i]))
             for i, (_, w) in enumerate(pipes)]
    readers = {r: proc for (r, _), proc in zip(pipes, procs)}
    worker_of = {r: i for i, (r, _) in enumerate(pipes)}
    done = worker_failed = False
    prep_s = step_s = 0.0  # running means: a worker's seconds per batch; ours between two requests (the model's)
    try:
        with _interrupts_deferred():
            gc.freeze()  # the workers' garbage collector then leaves the shared objects (and their pages) alone
            try:
                for proc in procs:
                    proc.start()
            finally:
                gc.unfreeze()
                for _, w in pipes:
                    w.close()
        for j in range(len(chunks)):
            while j not in ready:
                # We prepare a batch ourselves only while the workers are the bottleneck: when, at the measured
                # rates, preparing the unclaimed batches would take them longer than running the rest takes us;
                # and never more than a few ahead of a batch a worker is slow on (memory stays flat).
                unclaimed = len(chunks) - claimed.get_obj().value  # without its lock: an estimate is enough
                workers_behind = not prep_s or unclaimed * prep_s / workers > (len(chunks) - j) * step_s
                steal = not readers or (workers_behind and not mp_wait(list(readers), 0) and len(ready) < 2 * workers)
                k = _claim(claimed, len(chunks), lambda: _raise_if_dead(procs)) if steal else None
                if k is not None:
                    ready[k] = _prepare(backend, chunks[k], new_tokens=new_tokens)
                    continue
                if not readers:  # every worker exited and batch j is nowhere: never wait for it
                    raise LvlmlpError(f"extract: batch {j} was lost by a data-loader process; re-run to resume, "
                                      "with --workers 0 to prepare batches in this process")
                for conn in mp_wait(list(readers), 1.0):
                    try:
                        k, item, seconds = conn.recv()  # item: a prepared batch or the worker's error
                    except (EOFError, OSError):  # the worker exited: done, or dead with the batches it claimed
                        proc = readers.pop(conn)
                        conn.close()
                        proc.join(timeout=10)
                        if proc.exitcode != 0:
                            raise _died(proc) from None
                        continue
                    prep_s = seconds if not prep_s else 0.7 * prep_s + 0.3 * seconds
                    if isinstance(item, str):
                        if not worker_failed:
                            log.warning("extract: a data-loader process failed on a batch (%s); preparing it here",
                                        item)
                        worker_failed, item = True, None
                    elif isinstance(item[1], tuple):  # (which of the worker's shared buffers, the arrays' layout)
                        which, layout = item[1]
                        item = item[0], _from_buffer(buffers[worker_of[conn]][which], layout), item[2]
                    elif item[1] is not None:
                        item = item[0], {n: torch.from_numpy(a) for n, a in item[1].items()}, item[2]
                    slots[worker_of[conn]].release()  # after the copy: the worker may now reuse that buffer
                    ready[k] = item
            item = ready.pop(j)
            # After the last one, every chunk is claimed and every worker result consumed: the workers are exiting.
            done = j == len(chunks) - 1
            asked = time.perf_counter()
            yield item if item is not None else _prepare(backend, chunks[j], new_tokens=new_tokens)
            seconds = time.perf_counter() - asked
            step_s = seconds if not step_s else 0.7 * step_s + 0.3 * seconds
    finally:
        for proc in procs:
            if proc.pid is None:  # never started (interrupted while starting the others)
                continue
            # Workers that ran out of chunks exit by themselves (stopped early, we stop them); we reap them here,
            # a few milliseconds, so that no finished child is left for the host process to find: a job runner
            # or test harness that waits for its own children (os.wait) would otherwise be handed ours.
            if not done and proc.is_alive():
                proc.terminate()
            proc.join()
        for end in ends:
            end.close()
        for buf in (b for pair in buffers for b in pair):
            buf.close()
