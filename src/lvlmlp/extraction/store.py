"""Feature store: a run folder written in atomic shards, consolidated into memory-mappable arrays.

Layout of a finished run (see README):

    RUN/manifest.json     settings (model, weights hash, prompt template, dtype, vocab size, ...), `complete`
    RUN/meta.jsonl        one JSON object per row, manifest order: every manifest field but the image, + response
    RUN/logits.npy        (K, N, V) raw logits of generated tokens 0..K-1 (padding rows are zeros)
    RUN/n_tokens.npy      (N,) valid generated tokens per row (1 for a prefill-only run)
    RUN/row_index.npy     (N,) position of each row in the full input, so shard runs merge in manifest order
    RUN/last_logits.npy   (N, V) raw logits of each row's last generated token  [when fewer than all tokens are kept]
    RUN/hidden.npy        (N, H) final-norm hidden state at the first generated position   [--hidden]
    RUN/layers.npy        (L, N, H) hidden states of the chosen layers at that position      [--layers]
    RUN/vision.npy        (N, D) the vision encoder's output the projector reads, mean-pooled    [--vision]
    RUN/failures.jsonl    rows skipped with --on-error skip

While a run is in progress its rows live in `RUN/shards/NNNNNN.safetensors`, one file per `shard_size` rows with
the rows' metadata and a sha256 of its contents in the safetensors header. A shard is written to a temporary name
and renamed, so a killed process leaves whole shards only; re-running the same command skips the rows they hold.
Shard numbers only grow (one past the highest present), so a removed shard is never overwritten, and rows are
consolidated by their input position, so the order of the shards does not matter. Before a run is marked complete,
every shard's checksum is verified and every input row must be present exactly once.

One process at a time writes a run folder: `RUN/.lvlmlp.lock` is held with fcntl by the writer, and names it.
"""

from __future__ import annotations

import datetime as _dt
import errno
import functools
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from lvlmlp import outputs
from lvlmlp.data import read_jsonl, write_jsonl
from lvlmlp.errors import LvlmlpError
from lvlmlp.locking import FolderLock

# Settings that may differ between runs that are otherwise the same computation (not part of the identity).
_VOLATILE = {"created_at", "lvlmlp_version", "complete", "n_rows", "n_failed", "shard_size", "device",
             "batch_size", "engine", "replicas", "images_hash"}
# Keys of a manifest that the shards of one run legitimately differ in (merge ignores them).
_SHARD_KEYS = {"shard", "data_hash", "images_hash", "n_input_rows"}


# Bytes of row metadata per shard header (safetensors refuses headers over 100 MB) and per row (checked with the
# rows, before any model loads: `lvlmlp.data.check_rows`).
HEADER_BUDGET = 32 << 20
def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def identity(settings: dict) -> dict:
    """The settings that make a run what it is (without when, where and how it ran)."""
    return {k: v for k, v in settings.items() if k not in _VOLATILE}


def _differences(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def read_manifest_json(path: Path) -> dict:
    """A run's manifest.json as a dict, or a one-line error naming the file."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LvlmlpError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(doc, dict):
        raise LvlmlpError(f"{path}: not a run manifest (a JSON object is expected)")
    return doc


def check_output_folder(folder: str | Path, what: str = "--out") -> None:
    """Refuse to write into an existing folder that is neither empty nor an lvlmlp run: the user's files there
    (a `meta.jsonl`, a `shards/` of their own) must never be overwritten or deleted (the rule of every command's
    output, `lvlmlp.outputs`)."""
    outputs.check_output_folder(folder, "run", what)


@contextmanager
def _disk_errors(where: Path) -> Iterator[None]:
    """A full disk (or quota) becomes a one-line error saying that committed rows are kept."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        raise LvlmlpError(
            f"{where}: no space left on device ({os.strerror(err.errno)}); committed rows are kept: "
            "free some space and re-run the same command"
        ) from None


def images_changed(run_dir: Path) -> str:
    return (f"{run_dir}: the images of its rows changed since it was extracted (file size or modification time); "
            "extract into another --out, or delete the folder to extract them again")


def check_images_unchanged(run_dir: str | Path, data_hash: str, images_hash: str) -> None:
    """Before any model loads: a finished run of these rows (`data_hash`) whose images were replaced since is
    refused (a run of other rows is refused later, naming the settings that differ)."""
    path = Path(run_dir) / "manifest.json"
    if path.is_file():
        doc = read_manifest_json(path)
        if doc.get("complete") and doc.get("data_hash") == data_hash and \
                doc.get("images_hash") not in (None, images_hash):
            raise LvlmlpError(images_changed(Path(run_dir)))


def is_complete_run(run_dir: str | Path, settings: dict, ignore: tuple[str, ...] = ()) -> bool:
    """`run_dir` holds a finished run made with `settings` (keys in `ignore` not compared): callers use it to skip
    loading a model for work that is already done."""
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        return False
    old = read_manifest_json(path)
    mine = identity(json.loads(json.dumps(settings, default=str)))
    return bool(old.get("complete")) and all(old.get(k) == v for k, v in mine.items() if k not in ignore)


def _checksum(tensors: dict[str, np.ndarray], header: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for key in ("meta", "failures"):
        digest.update(header.get(key, "").encode())
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        digest.update(f"\0{name}\0{arr.dtype.str}\0{arr.shape}\0".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


class RunWriter:
    """Append rows batch by batch; `close()` consolidates the shards into the final arrays.

    Memory stays flat: at most one shard of rows is buffered, and consolidation copies shard by shard into
    memory-mapped output files. The writer holds the folder's lock from creation until `close()`.
    """

    def __init__(self, out_dir: str | Path, settings: dict, shard_size: int = 256,
                 image_stamps: dict[str, str] | None = None) -> None:
        """`image_stamps`: row id -> `data.image_stamp` of its image now. Each shard records its rows' stamps, and
        a resumed run whose committed rows' images were replaced since is refused (naming the shard)."""
        self.dir = Path(out_dir)
        self.image_stamps = image_stamps
        self.settings = json.loads(json.dumps(settings, default=str))  # plain JSON types, as it will be re-read
        self.shard_size = int(shard_size)
        self.done_ids: set[str] = set()
        self._shards: list[Path] = []
        self._next = 0  # number of the next shard: one past the highest ever present, never reused
        self._buf_meta: list[dict] = []
        self._buf_arrays: list[dict[str, np.ndarray]] = []
        self._buf_fail: list[dict] = []
        self.complete = False
        check_output_folder(self.dir)
        self._lock = FolderLock(self.dir)
        try:
            self._open()
        except BaseException:
            self._lock.release()
            raise

    def _open(self) -> None:
        """Under the lock: resume the run in the folder (its shards verified), or start one."""
        from lvlmlp import __version__

        check_output_folder(self.dir)  # again under the lock: another process may have written meanwhile
        manifest_path = self.dir / "manifest.json"
        if manifest_path.exists():
            old = read_manifest_json(manifest_path)
            diff = _differences(identity(old), identity(self.settings))
            if diff:
                raise LvlmlpError(
                    f"{self.dir}: holds a run with other settings ({', '.join(diff)} differ); "
                    "use another --out or delete the folder"
                )
            # the same rows: images_hash (their images' sizes and mtimes) is compared for a finished run only (a
            # resumed run's rows not yet committed may have had their image fixed meanwhile)
            if old.get("complete") and old.get("images_hash") not in (None, self.settings.get("images_hash")) \
                    and self.settings.get("images_hash") is not None:
                raise LvlmlpError(images_changed(self.dir))
            self.settings = {**old, **{k: v for k, v in self.settings.items() if k in _VOLATILE}}
            self.shard_size = int(old.get("shard_size", self.shard_size))
            self.complete = bool(old.get("complete"))
            if self.complete:
                run = Run(self.dir)
                self.done_ids = set(run.ids) | {f["id"] for f in run.failures}
                return
            for path in sorted((self.dir / "shards").glob("*.safetensors")):
                meta, failures, _, header = _verified_shard(path)
                self._check_images(path, header)
                self.done_ids.update(m["id"] for m in meta)
                self.done_ids.update(f["id"] for f in failures)
                self._shards.append(path)
                self._next = max(self._next, _shard_number(path) + 1)
        else:
            self.settings.update(
                lvlmlp_version=__version__,
                created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                shard_size=self.shard_size,
                complete=False,
            )
            _atomic_write_text(manifest_path, json.dumps(self.settings, indent=2))
        (self.dir / "shards").mkdir(exist_ok=True)

    def _check_images(self, path: Path, header: dict[str, str]) -> None:
        """A committed shard's rows (`header`: its verified header) whose image changed since they were extracted:
        refused with the remedy."""
        if self.image_stamps is None:
            return
        try:
            committed = json.loads(header.get("images", "{}"))
        except ValueError as err:
            raise LvlmlpError(f"{path}: corrupt shard ({type(err).__name__}); {_REMEDY}") from None
        for row_id, stamp in committed.items():
            if self.image_stamps.get(row_id, stamp) != stamp:
                raise LvlmlpError(f"{path}: the image of row {row_id!r} changed since this shard was committed "
                                  f"(file size or modification time); {_REMEDY}")

    def append(self, meta: list[dict], arrays: dict[str, np.ndarray]) -> None:
        """Buffer a batch of rows; a shard is written each time `shard_size` rows have accumulated."""
        n = len(meta)
        for name, arr in arrays.items():
            if arr.shape[0] != n:
                raise ValueError(f"array {name!r} has {arr.shape[0]} rows for {n} metadata rows")
        start = 0
        while start < n:  # whole batches are buffered; one is split only where a shard fills up
            stop = min(n, start + self.shard_size - len(self._buf_meta))
            self._buf_meta.extend(meta[start:stop])
            self._buf_arrays.append({k: v[start:stop] for k, v in arrays.items()})
            start = stop
            if len(self._buf_meta) >= self.shard_size:
                self._flush()

    def fail(self, row_id: str, message: str) -> None:
        """Record a skipped row (--on-error skip); it is committed with the next shard."""
        self._buf_fail.append({"id": row_id, "error": message})

    def _flush(self) -> None:
        if not self._buf_meta and not self._buf_fail:
            return
        tensors: dict[str, np.ndarray] = {}
        if self._buf_arrays:
            for name in self._buf_arrays[0]:
                tensors[name] = np.ascontiguousarray(np.concatenate([a[name] for a in self._buf_arrays]))
        # The rows' metadata lives in the safetensors header, which safetensors caps (100 MB): rows with large
        # metadata are committed as several shards, each header under HEADER_BUDGET.
        sizes = [len(json.dumps(m, default=str)) + 2 for m in self._buf_meta]
        start, parts = 0, []
        while start < len(sizes) or not parts:
            end, total = start, 0
            while end < len(sizes) and (end == start or total + sizes[end] <= HEADER_BUDGET):
                total, end = total + sizes[end], end + 1
            parts.append((start, end))
            start = end
        meta, fail = self._buf_meta, self._buf_fail
        for k, (a, b) in enumerate(parts):
            self._write_shard(meta[a:b], {name: t[a:b] for name, t in tensors.items()}, fail if k == 0 else [])
        self._buf_meta, self._buf_arrays, self._buf_fail = [], [], []

    def _write_shard(self, meta: list[dict], tensors: dict[str, np.ndarray], failures: list[dict]) -> None:
        header = {"meta": json.dumps(meta, default=str), "failures": json.dumps(failures)}
        if self.image_stamps is not None:  # what the rows' images were when extracted (checked on resume)
            header["images"] = json.dumps({m["id"]: self.image_stamps.get(m["id"], "missing") for m in meta})
        header["sha256"] = _checksum(tensors, header)
        path = self.dir / "shards" / f"{self._next:06d}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        with _disk_errors(self.dir):
            try:
                save_file(tensors, str(tmp), metadata=header)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            os.replace(tmp, path)  # the commit point: a shard exists whole or not at all
        self._shards.append(path)
        self._next += 1
        self.done_ids.update(m["id"] for m in meta)
        self.done_ids.update(f["id"] for f in failures)

    def release(self) -> None:
        """Give up the folder's lock without finishing (the caller stops on an error; committed shards stay)."""
        self._lock.release()

    def close(self, expected_ids: Sequence[str] | None = None) -> Run:
        """Flush the last shard and consolidate all shards into the final run folder. `expected_ids`: the input's
        ids in order; each must be committed exactly once (as a row or a failure) before the run is complete."""
        try:
            if not self.complete:
                self._flush()
                _consolidate(self.dir, self._shards, self.settings, expected_ids)
                self.complete = True
            return Run(self.dir)
        finally:
            self._lock.release()


def _shard_number(path: Path) -> int:
    try:
        return int(path.name.split(".")[0])
    except ValueError:
        raise LvlmlpError(f"{path}: not a shard lvlmlp wrote (unexpected name); move it out of the folder") from None


_REMEDY = "delete this file and re-run the same command: its rows will be done again"


def _shard_header(path: Path) -> tuple[list[dict], list[dict], dict[str, tuple[tuple[int, ...], np.dtype]],
                                        np.ndarray | None]:
    """(meta, failures, {name: (row shape, dtype)}, row_index) of a shard, reading its header and row_index only."""
    try:
        with safe_open(str(path), framework="np") as f:
            header = f.metadata() or {}
            shapes = {}
            for name in f.keys():
                sl = f.get_slice(name)
                shapes[name] = (tuple(sl.get_shape()[1:]), sl[0:0].dtype)
            index = f.get_tensor("row_index") if "row_index" in f.keys() else None
        meta, failures = json.loads(header.get("meta", "[]")), json.loads(header.get("failures", "[]"))
    except (SafetensorError, OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LvlmlpError(f"{path}: corrupt shard ({first}); {_REMEDY}") from None
    return meta, failures, shapes, index


def _verified_shard(path: Path) -> tuple[list[dict], list[dict], dict[str, np.ndarray], dict[str, str]]:
    """(meta, failures, tensors, header) of a committed shard whose checksum matches; a one-line error naming the file
    and the remedy otherwise (its rows are redone once the file is removed)."""
    try:
        with safe_open(str(path), framework="np") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        meta, failures = json.loads(header.get("meta", "[]")), json.loads(header.get("failures", "[]"))
    except (SafetensorError, OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LvlmlpError(f"{path}: corrupt shard ({first}); {_REMEDY}") from None
    if "sha256" in header and _checksum(tensors, header) != header["sha256"]:
        raise LvlmlpError(f"{path}: shard contents do not match its checksum (corrupted on disk); {_REMEDY}")
    return meta, failures, tensors, header


def _consolidate(run_dir: Path, shards: Sequence[Path], settings: dict, expected_ids: Sequence[str] | None) -> None:
    """Copy shard rows, shard by shard, into memory-mapped final arrays in input order; then mark the run complete.
    The rows are checked against `expected_ids` before the copy, every shard against its checksum as it is copied,
    and only then is anything but temporary files written."""
    for stale in run_dir.glob("*.npy.tmp"):
        stale.unlink()  # left by a consolidation that was killed: ours, and never read
    metas: list[list[dict]] = []
    positions: list[np.ndarray] = []
    failures: list[dict] = []
    shapes: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for path in shards:  # headers only here; each shard's data is read (and verified) once, when copied
        meta, fails, shard_shapes, index = _shard_header(path)
        metas.append(meta)
        failures.extend(fails)
        positions.append(np.asarray(index) if meta and index is not None else np.empty(0, dtype=np.int64))
        if meta:
            for name, shape in shard_shapes.items():
                shapes.setdefault(name, shape)
    slots = _row_slots(run_dir, shards, metas, positions, failures, expected_ids)
    n = sum(len(m) for m in metas)
    with _disk_errors(run_dir):
        outputs: dict[str, np.ndarray] = {}
        try:
            for name, (row_shape, dtype) in shapes.items():
                tmp = run_dir / f"{name}.npy.tmp"
                outputs[name] = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype,
                                                          shape=_final_shape(name, n, row_shape))
                # Reserve the blocks now: a full disk then fails here with ENOSPC, never with SIGBUS mid-copy.
                with tmp.open("r+b") as fh:
                    os.posix_fallocate(fh.fileno(), 0, tmp.stat().st_size)
            for path, meta, where in zip(shards, metas, slots):
                if not meta:
                    continue
                tensors = _verified_shard(path)[2]
                for name, out in outputs.items():
                    _put(name, out, where, tensors[name])
            for out in outputs.values():
                out.flush()
            names = list(outputs)
            outputs.clear()
            for name in names:
                os.replace(run_dir / f"{name}.npy.tmp", run_dir / f"{name}.npy")
        except BaseException:
            outputs.clear()
            for stale in run_dir.glob("*.npy.tmp"):
                stale.unlink()
            raise
        ordered: list[dict | None] = [None] * n
        for meta, where in zip(metas, slots):
            for m, i in zip(meta, where):
                ordered[i] = m
        write_jsonl(run_dir / "meta.jsonl", ordered)  # type: ignore[arg-type]
        write_jsonl(run_dir / "failures.jsonl", failures)
        settings.update(complete=True, n_rows=n, n_failed=len(failures))
        _atomic_write_text(run_dir / "manifest.json", json.dumps(settings, indent=2))
    shutil.rmtree(run_dir / "shards", ignore_errors=True)


def _row_slots(run_dir: Path, shards: Sequence[Path], metas: list[list[dict]], positions: list[np.ndarray],
               failures: list[dict], expected_ids: Sequence[str] | None) -> list[np.ndarray]:
    """Where each shard's rows go in the final arrays: sorted by input position (`row_index`), each row once."""
    seen: dict[str, Path] = {}
    for path, meta in zip(shards, metas):
        for m in meta:
            if m["id"] in seen:
                raise LvlmlpError(f"{run_dir}: row {m['id']!r} is in two shards ({seen[m['id']].name} and "
                                  f"{path.name}); remove one of them and re-run the same command")
            seen[m["id"]] = path
    failed = {f["id"] for f in failures} - set(seen)
    if expected_ids is not None:
        expected = list(expected_ids)
        missing = [i for i in expected if i not in seen and i not in failed]
        extra = sorted(set(seen) - set(expected))
        if missing or extra:
            which = f"row {missing[0]!r} is missing" if missing else f"row {extra[0]!r} is not in the input"
            raise LvlmlpError(f"{run_dir}: {which} ({len(missing)} missing, {len(extra)} unexpected); "
                              "the run is not marked complete; re-run the same command")
    n = sum(len(m) for m in metas)
    have_positions = all(len(p) == len(m) for p, m in zip(positions, metas))
    keys = np.concatenate(positions) if have_positions and n else np.arange(n)
    if len(np.unique(keys)) != n:
        raise LvlmlpError(f"{run_dir}: two shards hold rows of the same input position; the run is not complete")
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(keys, kind="stable")] = np.arange(n)
    bounds = np.cumsum([0, *[len(m) for m in metas]])
    return [rank[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _final_shape(name: str, n: int, row_shape: tuple[int, ...]) -> tuple[int, ...]:
    # Token-major (K, N, V) and layer-major (L, N, H) so that logits(t) and layer(L) are contiguous slices.
    if name in ("logits", "layers"):
        return (row_shape[0], n, *row_shape[1:])
    return (n, *row_shape)


def _put(name: str, out: np.ndarray, where: np.ndarray, block: np.ndarray) -> None:
    # Rows of one shard are consecutive in input order unless a shard was redone: a slice when we can.
    index: slice | np.ndarray = where
    if len(where) and np.array_equal(where, np.arange(where[0], where[0] + len(where))):
        index = slice(int(where[0]), int(where[0]) + len(where))
    if name in ("logits", "layers"):
        out[:, index] = np.swapaxes(block, 0, 1)
    else:
        out[index] = block


class Run:
    """A finished run folder, read lazily: arrays are memory-mapped, never loaded whole."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            raise LvlmlpError(f"{self.path}: not a run folder (no manifest.json)")
        self.manifest: dict = read_manifest_json(manifest_path)
        if not self.manifest.get("complete"):
            raise LvlmlpError(f"{self.path}: run is incomplete; re-run the same extract command to finish it")
        meta_path = self.path / "meta.jsonl"
        if not meta_path.is_file():
            raise LvlmlpError(f"{meta_path}: missing; the run folder is damaged (extract it again)")
        self.meta: list[dict] = read_jsonl(meta_path)
        for line, m in enumerate(self.meta, 1):
            if not isinstance(m.get("id"), str):
                raise LvlmlpError(f"{meta_path}: row {line} has no string 'id'")
        self.ids: list[str] = [m["id"] for m in self.meta]
        self._validate()

    def _validate(self) -> None:
        """Every array has one row per meta row, as the manifest says: a truncated or swapped file is named here
        rather than failing later inside numpy."""
        n = self.manifest.get("n_rows")
        if isinstance(n, int) and n != len(self.meta):
            raise LvlmlpError(f"{self.path / 'meta.jsonl'}: {len(self.meta)} rows, the manifest says {n}; "
                              "the run folder is damaged (extract it again)")
        for path in sorted(self.path.glob("*.npy")):
            try:
                arr = np.load(path, mmap_mode="r")
            except (ValueError, OSError) as err:
                raise LvlmlpError(f"{path}: unreadable array ({str(err).splitlines()[0]}); "
                                  "the run folder is damaged (extract it again)") from None
            axis = 1 if path.stem in ("logits", "layers") else 0
            rows = arr.shape[axis] if arr.ndim > axis else -1
            if rows != len(self.meta):
                raise LvlmlpError(f"{path}: holds {rows} rows but meta.jsonl has {len(self.meta)}; "
                                  "the run folder is damaged (extract it again)")
            vocab = self.manifest.get("vocab_size")
            if path.stem == "logits" and isinstance(vocab, int) and arr.shape[-1] != vocab:
                raise LvlmlpError(f"{path}: {arr.shape[-1]} logits per row, the manifest says vocab_size {vocab}")

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, rows={len(self)}, model={self.manifest.get('model')!r})"

    def _array(self, name: str) -> np.ndarray:
        path = self.path / f"{name}.npy"
        if not path.exists():
            raise LvlmlpError(f"{self.path}: this run has no {name!r} array (extract it with the matching option)")
        return np.load(path, mmap_mode="r")

    @property
    def n_logit_tokens(self) -> int:
        return int(self._array("logits").shape[0]) if len(self) else 0

    def logits(self, t: int = 0) -> np.ndarray:
        """(N, V) raw logits of generated token t; rows with n_tokens <= t hold zeros (no such token)."""
        arr = self._array("logits")
        if not -arr.shape[0] <= t < arr.shape[0]:
            raise LvlmlpError(f"{self.path}: token {t} not stored (this run keeps {arr.shape[0]} token(s))")
        return arr[t]

    @functools.cached_property
    def n_tokens(self) -> np.ndarray:
        """(N,) valid generated tokens per row; read once (analyses index it many times), read-only."""
        return _read_only(np.array(self._array("n_tokens")))

    @property
    def row_index(self) -> np.ndarray:
        return np.asarray(self._array("row_index"))

    def hidden(self) -> np.ndarray:
        return self._array("hidden")

    def vision(self) -> np.ndarray:
        """(N, D) the vision encoder's output that the projector reads, mean-pooled over the image's tokens."""
        return self._array("vision")

    @property
    def has_last_logits(self) -> bool:
        return (self.path / "last_logits.npy").exists()

    def last_logits(self) -> np.ndarray:
        """(N, V) raw logits of each row's last generated token (kept when `logits_tokens` < `max_new_tokens`)."""
        return self._array("last_logits")

    def layer(self, layer: int) -> np.ndarray:
        layers = list(self.manifest.get("layers") or [])
        if layer not in layers:
            raise LvlmlpError(f"{self.path}: layer {layer} not extracted (have {layers or 'none'})")
        return self._array("layers")[layers.index(layer)]

    @property
    def responses(self) -> list[str | None]:
        return [m.get("response") for m in self.meta]

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """(N,) float labels with NaN where a row has none (built once from `meta`, read-only)."""
        return _read_only(
            np.array([m["label"] if m.get("label") is not None else math.nan for m in self.meta], dtype=float)
        )

    @property
    def splits(self) -> list[str | None]:
        return [m.get("split") for m in self.meta]

    @functools.cached_property
    def failures(self) -> list[dict]:
        """Rows skipped with --on-error skip ({"id", "error"}), read once."""
        path = self.path / "failures.jsonl"
        return read_jsonl(path) if path.exists() else []


def _read_only(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False  # cached on the Run: a caller changing it would change every later reader's view
    return arr


def open_run(path: str | Path) -> Run:
    """Open a finished run folder (README, Run folder layout)."""
    return Run(path)


def merge_runs(run_dirs: Sequence[str | Path], out_dir: str | Path, chunk: int = 256) -> Run:
    """Merge the runs of `extract --shard I/N` into one run in manifest order, streaming chunk by chunk.

    Every shard 0..N-1 must be given, once; a merge that was killed resumes when the same command is re-run."""
    runs = [open_run(d) for d in run_dirs]
    if not runs:
        raise LvlmlpError("merge: no run folders given")
    base = {k: v for k, v in identity(runs[0].manifest).items() if k not in _SHARD_KEYS}
    for run in runs[1:]:
        inputs = [(r.manifest.get("selection") or {}).get("input_hash") for r in (runs[0], run)]
        if inputs[0] != inputs[1]:  # each shard's own rows differ; the whole input they were cut from must not
            raise LvlmlpError(f"merge: {run.path} is a shard of other input rows than {runs[0].path} (a changed "
                              "or another manifest or task selection); merge the shards of one extraction")
        other = {k: v for k, v in identity(run.manifest).items() if k not in _SHARD_KEYS}
        diff = _differences(base, other)
        if diff:
            raise LvlmlpError(f"merge: {run.path} was made with other settings ({', '.join(diff)} differ)")
    _check_shard_set(runs)
    # (run, local position) of every row, ordered by its position in the full input.
    order = sorted(
        ((int(ri), r, i) for r, run in enumerate(runs) for i, ri in enumerate(run.row_index)),
        key=lambda x: x[0],
    )
    if len({ri for ri, _, _ in order}) != len(order):
        raise LvlmlpError("merge: the same input row appears in more than one run (overlapping shards?)")
    settings = {k: v for k, v in runs[0].manifest.items() if k not in _SHARD_KEYS | _VOLATILE}
    settings["merged_from"] = [str(run.path.resolve()) for run in runs]
    writer = RunWriter(out_dir, settings, shard_size=chunk)
    if writer.complete:
        return writer.close()
    try:
        names = [p.stem for p in sorted(runs[0].path.glob("*.npy"))]
        # Memory-map every source array once; chunks gather their rows from these maps.
        sources = {name: [run._array(name) for run in runs] for name in names}
        todo = [(ri, r, i) for ri, r, i in order if runs[r].ids[i] not in writer.done_ids]
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            meta = [runs[r].meta[i] for _, r, i in part]
            arrays = {
                name: np.stack([_row_of(name, maps[r], i) for _, r, i in part]) for name, maps in sources.items()
            }
            writer.append(meta, arrays)
        for run in runs:
            for failure in run.failures:
                if failure["id"] not in writer.done_ids:
                    writer.fail(failure["id"], failure["error"])
    except BaseException:
        writer.release()
        raise
    return writer.close([runs[r].ids[i] for _, r, i in order] + [f["id"] for run in runs for f in run.failures])


def _check_shard_set(runs: Sequence[Run]) -> None:
    """The runs are shards i/N of one extraction, every i from 0 to N-1 once (a missing shard is named)."""
    have: dict[int, Path] = {}
    total = None
    for run in runs:
        spec = run.manifest.get("shard")
        try:
            i, n = (int(x) for x in str(spec).split("/"))
        except ValueError:
            if len(runs) == 1:
                return  # one whole run: a copy
            raise LvlmlpError(f"merge: {run.path} is not a shard of `extract --shard I/N` (shard: {spec!r})") from None
        if total is not None and n != total:
            raise LvlmlpError(f"merge: {run.path} is shard {i}/{n} but another run is of {total} shards")
        total = n
        if i in have:
            raise LvlmlpError(f"merge: shard {i}/{n} given twice ({have[i]} and {run.path})")
        have[i] = run.path
    assert total is not None
    missing = [i for i in range(total) if i not in have]
    if missing:
        raise LvlmlpError(
            f"merge: shard {missing[0]}/{total} is missing ({len(have)} of {total} shards given); "
            f"run `lvlmlp extract ... --shard {missing[0]}/{total}` and merge all {total}"
        )


def _row_of(name: str, arr: np.ndarray, i: int) -> np.ndarray:
    return np.asarray(arr[:, i] if name in ("logits", "layers") else arr[i])
