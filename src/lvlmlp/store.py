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
    RUN/failures.jsonl    rows skipped with --on-error skip

While a run is in progress its rows live in `RUN/shards/NNNNNN.safetensors`, one file per `shard_size` rows with
the rows' metadata in the safetensors header. A shard is written to a temporary name and renamed, so a killed
process leaves whole shards only; re-running the same command skips the rows they hold.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lvlmlp.data import read_jsonl, write_jsonl
from lvlmlp.errors import LvlmlpError

# Settings that may differ between runs that are otherwise the same computation (not part of the identity).
_VOLATILE = {"created_at", "lvlmlp_version", "complete", "n_rows", "n_failed", "shard_size", "device",
             "batch_size"}
# Keys of a manifest that the shards of one run legitimately differ in (merge ignores them).
_SHARD_KEYS = {"shard", "data_hash", "n_input_rows"}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _identity(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in _VOLATILE}


def _differences(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def is_complete_run(run_dir: str | Path, settings: dict, ignore: tuple[str, ...] = ()) -> bool:
    """`run_dir` holds a finished run made with `settings` (keys in `ignore` not compared): callers use it to skip
    loading a model for work that is already done."""
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        return False
    old = json.loads(path.read_text())
    mine = _identity(json.loads(json.dumps(settings, default=str)))
    return bool(old.get("complete")) and all(old.get(k) == v for k, v in mine.items() if k not in ignore)


class RunWriter:
    """Append rows batch by batch; `close()` consolidates the shards into the final arrays.

    Memory stays flat: at most one shard of rows is buffered, and consolidation copies shard by shard into
    memory-mapped output files.
    """

    def __init__(self, out_dir: str | Path, settings: dict, shard_size: int = 256) -> None:
        from lvlmlp import __version__

        self.dir = Path(out_dir)
        self.settings = json.loads(json.dumps(settings, default=str))  # plain JSON types, as it will be re-read
        self.shard_size = int(shard_size)
        self.done_ids: set[str] = set()
        self._shards: list[Path] = []
        self._buf_meta: list[dict] = []
        self._buf_arrays: list[dict[str, np.ndarray]] = []
        self._buf_fail: list[dict] = []
        manifest_path = self.dir / "manifest.json"
        if manifest_path.exists():
            old = json.loads(manifest_path.read_text())
            diff = _differences(_identity(old), _identity(self.settings))
            if diff:
                raise LvlmlpError(
                    f"{self.dir}: holds a run with other settings ({', '.join(diff)} differ); "
                    "use another --out or delete the folder"
                )
            self.settings = {**old, **{k: v for k, v in self.settings.items() if k in _VOLATILE}}
            self.shard_size = int(old.get("shard_size", shard_size))
            self.complete = bool(old.get("complete"))
            if self.complete:
                run = Run(self.dir)
                self.done_ids = set(run.ids) | {f["id"] for f in run.failures}
                return
            for path in sorted((self.dir / "shards").glob("*.safetensors")):
                meta, failures = _read_shard_header(path)
                self.done_ids.update(m["id"] for m in meta)
                self.done_ids.update(f["id"] for f in failures)
                self._shards.append(path)
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.complete = False
            self.settings.update(
                lvlmlp_version=__version__,
                created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                shard_size=self.shard_size,
                complete=False,
            )
            _atomic_write_text(manifest_path, json.dumps(self.settings, indent=2))
        (self.dir / "shards").mkdir(exist_ok=True)

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
        header = {"meta": json.dumps(self._buf_meta, default=str), "failures": json.dumps(self._buf_fail)}
        path = self.dir / "shards" / f"{len(self._shards):06d}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=header)
        os.replace(tmp, path)  # the commit point: a shard exists whole or not at all
        self._shards.append(path)
        self.done_ids.update(m["id"] for m in self._buf_meta)
        self.done_ids.update(f["id"] for f in self._buf_fail)
        self._buf_meta, self._buf_arrays, self._buf_fail = [], [], []

    def close(self) -> Run:
        """Flush the last shard and consolidate all shards into the final run folder."""
        if self.complete:
            return Run(self.dir)
        self._flush()
        _consolidate(self.dir, self._shards, self.settings)
        return Run(self.dir)


def _read_shard_header(path: Path) -> tuple[list[dict], list[dict]]:
    with safe_open(str(path), framework="np") as f:
        header = f.metadata() or {}
    return json.loads(header.get("meta", "[]")), json.loads(header.get("failures", "[]"))


def _consolidate(run_dir: Path, shards: Sequence[Path], settings: dict) -> None:
    """Copy shard rows, shard by shard, into memory-mapped final arrays; then mark the run complete."""
    metas: list[list[dict]] = []
    failures: list[dict] = []
    shapes: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for path in shards:
        meta, fails = _read_shard_header(path)
        metas.append(meta)
        failures.extend(fails)
        if meta:
            with safe_open(str(path), framework="np") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    shapes.setdefault(name, (tuple(sl.get_shape()[1:]), np.dtype(_np_dtype(sl.get_dtype()))))
    n = sum(len(m) for m in metas)
    outputs: dict[str, np.ndarray] = {}
    for name, (row_shape, dtype) in shapes.items():
        outputs[name] = np.lib.format.open_memmap(
            run_dir / f"{name}.npy.tmp", mode="w+", dtype=dtype, shape=_final_shape(name, n, row_shape)
        )
    start = 0
    for path, meta in zip(shards, metas):
        if not meta:
            continue
        stop = start + len(meta)
        with safe_open(str(path), framework="np") as f:
            for name, out in outputs.items():
                _put(name, out, start, stop, f.get_tensor(name))
        start = stop
    for name, out in outputs.items():
        out.flush()
        del out
        os.replace(run_dir / f"{name}.npy.tmp", run_dir / f"{name}.npy")
    write_jsonl(run_dir / "meta.jsonl", (m for meta in metas for m in meta))
    write_jsonl(run_dir / "failures.jsonl", failures)
    settings.update(complete=True, n_rows=n, n_failed=len(failures))
    _atomic_write_text(run_dir / "manifest.json", json.dumps(settings, indent=2))
    shutil.rmtree(run_dir / "shards", ignore_errors=True)


def _np_dtype(st_dtype: str) -> str:
    return {"F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
            "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}[st_dtype]


def _final_shape(name: str, n: int, row_shape: tuple[int, ...]) -> tuple[int, ...]:
    # Token-major (K, N, V) and layer-major (L, N, H) so that logits(t) and layer(L) are contiguous slices.
    if name in ("logits", "layers"):
        return (row_shape[0], n, *row_shape[1:])
    return (n, *row_shape)


def _put(name: str, out: np.ndarray, start: int, stop: int, block: np.ndarray) -> None:
    if name in ("logits", "layers"):
        out[:, start:stop] = np.swapaxes(block, 0, 1)
    else:
        out[start:stop] = block



class Run:
    """A finished run folder, read lazily: arrays are memory-mapped, never loaded whole."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            raise LvlmlpError(f"{self.path}: not a run folder (no manifest.json)")
        self.manifest: dict = json.loads(manifest_path.read_text())
        if not self.manifest.get("complete"):
            raise LvlmlpError(f"{self.path}: run is incomplete; re-run the same extract command to finish it")
        self.meta: list[dict] = read_jsonl(self.path / "meta.jsonl")
        self.ids: list[str] = [m["id"] for m in self.meta]

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

    @property
    def failures(self) -> list[dict]:
        path = self.path / "failures.jsonl"
        return read_jsonl(path) if path.exists() else []


def _read_only(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False  # cached on the Run: a caller changing it would change every later reader's view
    return arr


def open_run(path: str | Path) -> Run:
    """Open a finished run folder (contract section 2)."""
    return Run(path)


def merge_runs(run_dirs: Sequence[str | Path], out_dir: str | Path, chunk: int = 256) -> Run:
    """Merge the runs of `extract --shard I/N` into one run in manifest order, streaming chunk by chunk."""
    runs = [open_run(d) for d in run_dirs]
    if not runs:
        raise LvlmlpError("merge: no run folders given")
    base = {k: v for k, v in _identity(runs[0].manifest).items() if k not in _SHARD_KEYS}
    for run in runs[1:]:
        other = {k: v for k, v in _identity(run.manifest).items() if k not in _SHARD_KEYS}
        diff = _differences(base, other)
        if diff:
            raise LvlmlpError(f"merge: {run.path} was made with other settings ({', '.join(diff)} differ)")
    # (run, local position) of every row, ordered by its position in the full input.
    order = sorted(
        ((int(ri), r, i) for r, run in enumerate(runs) for i, ri in enumerate(run.row_index)),
        key=lambda x: x[0],
    )
    if len({ri for ri, _, _ in order}) != len(order):
        raise LvlmlpError("merge: the same input row appears in more than one run (overlapping shards?)")
    settings = {k: v for k, v in runs[0].manifest.items() if k not in _SHARD_KEYS | _VOLATILE}
    settings["merged_from"] = [str(run.path) for run in runs]
    out = Path(out_dir)
    if (out / "manifest.json").exists():
        raise LvlmlpError(f"merge: {out} already exists")
    writer = RunWriter(out, settings, shard_size=chunk)
    names = [p.stem for p in sorted(runs[0].path.glob("*.npy"))]
    # Memory-map every source array once; chunks gather their rows from these maps.
    sources = {name: [run._array(name) for run in runs] for name in names}
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        meta = [runs[r].meta[i] for _, r, i in part]
        arrays = {
            name: np.stack([_row_of(name, maps[r], i) for _, r, i in part]) for name, maps in sources.items()
        }
        writer.append(meta, arrays)
    for run in runs:
        for failure in run.failures:
            writer.fail(failure["id"], failure["error"])
    return writer.close()


def _row_of(name: str, arr: np.ndarray, i: int) -> np.ndarray:
    return np.asarray(arr[:, i] if name in ("logits", "layers") else arr[i])
