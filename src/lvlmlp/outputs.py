"""Where commands write: one rule for every output of every command (docs/run-folders.md).

- An output never is, contains or lies inside one of the command's own inputs (paths resolved, symlinks followed).
- An output folder is new, empty, or one the same kind of command wrote: it holds the marker file `MARKER`
  naming its kind (a run folder is also recognised by its `manifest.json`). A folder holding anything else is the
  user's and is never written to.
- Writes are atomic: a folder is built under a temporary name beside it and swapped into place, a file is written
  to a temporary name and renamed, so that a failed or killed write leaves the old output whole (or nothing).
- A file given where a folder is expected (or the reverse), a read-only place or a path through a file is a
  one-line error naming the option, before any model or data is loaded.

Standard library only: the command modules call `check_output` before importing anything heavy.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lvlmlp.errors import LvlmlpError

MARKER = ".lvlmlp-output.json"
# Files lvlmlp itself leaves in any of its folders (the writer's lock) do not make a folder the user's.
_OWN_LITTER = {".lvlmlp.lock", MARKER}

# What each kind of output folder is, in words (the error names it).
KINDS = {
    "run": "an lvlmlp run folder",
    "probe": "a probe folder (lvlmlp probe train)",
    "eval": "a probe eval folder (lvlmlp probe eval)",
    "report": "a report folder (lvlmlp report)",
    "experiment": "an `lvlmlp run` folder",
    "finetune": "an lvlmlp finetune folder",
    "demo": "an lvlmlp demo folder",
    "tiny-data": "an lvlmlp tiny-data folder",
    "tiny-model": "an lvlmlp tiny-model folder",
    "transfer": "a transfer table folder (lvlmlp transfer)",
}

# An `lvlmlp run` folder written before the marker: its step stamps and nothing but its own entries.
_OLD_EXPERIMENT = {"steps", "runs", "evals", "probes", "analyses", "report", "finetune", "config.yaml", *_OWN_LITTER}

Inputs = Mapping[str, "str | Path | Iterable[str | Path] | None"]


def _resolved(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def _input_paths(inputs: Inputs) -> Iterator[tuple[str, Path]]:
    for flag, value in inputs.items():
        if value is None:
            continue
        for item in [value] if isinstance(value, (str, Path)) else value:
            if item is not None and str(item) and os.path.lexists(os.path.expanduser(str(item))):
                yield flag, _resolved(item)  # a hub id (no such local path) is no file of ours to protect


def check_not_an_input(out: str | Path, inputs: Inputs, what: str = "--out") -> None:
    """Refuse an output that is, contains or lies inside one of `inputs` ({flag: path or paths})."""
    target = _resolved(out)
    for flag, src in _input_paths(inputs):
        if target == src:
            relation = "is"
        elif src in target.parents:
            relation = "lies inside"
        elif target in src.parents:
            relation = "contains"
        else:
            continue
        raise LvlmlpError(f"{what} {out}: {relation} {flag} {src} (an input of this command, which writing "
                          f"{what} would overwrite); give another {what}")


def _marker_kind(folder: Path) -> str | None:
    try:
        doc = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc.get("kind") if isinstance(doc, dict) else None


def _is_old_run(folder: Path) -> bool:
    # Run folders predate the marker: their manifest.json (with the writer's version) is theirs.
    try:
        doc = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as err:
        raise LvlmlpError(f"{folder / 'manifest.json'}: not valid JSON ({err})") from None
    if not isinstance(doc, dict):
        raise LvlmlpError(f"{folder / 'manifest.json'}: not a run manifest (a JSON object is expected)")
    return "lvlmlp_version" in doc


def check_output_folder(folder: str | Path, kind: str, what: str = "--out") -> None:
    """Refuse a folder that exists and is neither empty nor of `kind` (its marker, or a run's manifest): the user's
    files there must never be overwritten or deleted. Also refuse a file, or a place that cannot be written."""
    folder = Path(folder)
    _check_writable(folder, what, want_folder=True)
    if not folder.is_dir():
        return
    names = {p.name for p in folder.iterdir()}
    if not names - _OWN_LITTER:
        return
    if _marker_kind(folder) == kind or (kind == "run" and _is_old_run(folder)) or \
            (kind == "experiment" and "steps" in names and names <= _OLD_EXPERIMENT):
        return
    raise LvlmlpError(
        f"{what} {folder}: exists and is not {KINDS[kind]} (it holds {', '.join(sorted(names)[:3])}"
        f"{', ...' if len(names) > 3 else ''}); give an empty or new folder"
    )


def _check_writable(path: Path, what: str, want_folder: bool) -> None:
    if path.exists():
        if want_folder and not path.is_dir():
            raise LvlmlpError(f"{what} {path}: exists and is not a folder")
        if not want_folder and path.is_dir():
            raise LvlmlpError(f"{what} {path}: is a folder; give a file name")
    # The nearest existing folder above (or the folder itself) is where the first write happens.
    probe = path if path.is_dir() else path.parent
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():
            raise LvlmlpError(f"{what} {path}: {probe} is a broken symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        raise LvlmlpError(f"{what} {path}: {probe} is a file, not a folder, so nothing can be written under it")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise LvlmlpError(f"{what} {path}: {probe} is not writable (permission denied)")


def check_output(out: str | Path, kind: str | None, inputs: Inputs | None = None, what: str = "--out") -> Path:
    """The whole rule for one output, checked before anything is loaded: `kind` None for a file output, else the
    kind of folder (`KINDS`). Returns `out` as a Path."""
    if out is None or not str(out):
        raise LvlmlpError(f"{what}: give a path")
    out = Path(out)
    check_not_an_input(out, inputs or {}, what)
    if kind is None:
        _check_writable(out, what, want_folder=False)
    else:
        check_output_folder(out, kind, what)
    return out


def write_marker(folder: Path, kind: str) -> None:
    from lvlmlp import __version__

    write_text_atomic(folder / MARKER, json.dumps({"kind": kind, "written_by": "lvlmlp", "lvlmlp_version": __version__})
                      + "\n")


def claim_folder(out: str | Path, kind: str, what: str = "--out") -> Path:
    """A folder written in place (a resumable command: `lvlmlp run`, `finetune`, `demo`): checked, created and
    marked as `kind`, so that a re-run recognises it and anything else is refused."""
    out = Path(out)
    check_output_folder(out, kind, what)
    with os_errors(out, what):
        out.mkdir(parents=True, exist_ok=True)
        if _marker_kind(out) != kind:
            write_marker(out, kind)
    return out


@contextmanager
def os_errors(where: str | Path, what: str = "--out", under: Path | None = None) -> Iterator[None]:
    """An operating system's refusal to write (read-only, not a folder, full disk) as a one-line error. `under`:
    only errors on paths under that folder are the output's (a permission error on an input stays its own)."""
    try:
        yield
    except OSError as err:
        full = err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
        if not full and not isinstance(err, (PermissionError, NotADirectoryError, IsADirectoryError,
                                             FileExistsError)):
            raise
        if not full and under is not None and err.filename is not None and \
                Path(under) not in [Path(str(err.filename)), *Path(str(err.filename)).parents]:
            raise
        raise LvlmlpError(f"{what} {where}: cannot write ({os.strerror(err.errno) if err.errno else err}"
                          f"{': ' + str(err.filename) if err.filename else ''}); nothing was changed there") from None


def _temporary_sibling(path: Path, suffix: str) -> Path:
    # Beside the target (same file system, so the final rename is atomic); hidden; unique per writer.
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep(path: Path) -> None:
    """What a killed writer of `path` left beside it: its temporary build is removed; an old output moved aside
    during a swap (the two-rename fallback) is put back when `path` itself is missing."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)-[0-9a-f]{{8}}\.(tmp|old)$")
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return
    for sibling in siblings:
        match = pattern.match(sibling.name)
        if not match or int(match[1]) == os.getpid() or _alive(int(match[1])):
            continue
        if match[2] == "old" and not path.exists():
            os.rename(sibling, path)
        elif sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where it is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False  # the file system cannot: fall back to two renames
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))


def _swap_into_place(new: Path, out: Path) -> None:
    if not out.exists():
        os.rename(new, out)
        return
    if _exchange(new, out):
        shutil.rmtree(new)  # `new` now holds the old output
        return
    old = _temporary_sibling(out, ".old")
    os.rename(out, old)  # killed here: the old output is kept whole under the hidden name
    os.rename(new, out)
    shutil.rmtree(old)


@contextmanager
def replaced_folder(out: str | Path, kind: str, what: str = "--out") -> Iterator[Path]:
    """Yield an empty temporary folder beside `out`; when the block succeeds it is marked as `kind` and replaces
    `out` in one atomic step (the old folder, if any, is removed after). On any failure `out` is as it was.
    `out` must be new, empty or of `kind` (`check_output_folder`)."""
    out = Path(out)
    if out.is_symlink():  # the folder it points to is replaced, the link kept
        out = _resolved(out)
    _sweep(out)
    check_output_folder(out, kind, what)
    tmp = _temporary_sibling(out, ".tmp")
    try:
        with os_errors(out, what):
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        with os_errors(out, what, under=tmp):
            yield tmp
        with os_errors(out, what):
            write_marker(tmp, kind)
            check_output_folder(out, kind, what)  # again: another process may have written there meanwhile
            _swap_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def replaced_file(out: str | Path, what: str = "--out") -> Iterator[Path]:
    """Yield a temporary path beside the file `out`; when the block succeeds it is renamed to `out` (atomic), so a
    failed run never leaves a mixture of old and new lines."""
    out = Path(out)
    _check_writable(out, what, want_folder=False)
    _sweep(out)
    tmp = _temporary_sibling(out, ".tmp")
    try:
        with os_errors(out, what):
            out.parent.mkdir(parents=True, exist_ok=True)
        with os_errors(out, what, under=tmp):
            yield tmp
        with os_errors(out, what):
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    """`path.write_text(text)`, but a reader sees the old text or the new one, never a part."""
    path = Path(path)
    tmp = _temporary_sibling(path, ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_json(path: str | Path, text: str | None = None, where: str = "", kind: type = dict) -> Any:
    """The JSON document of a result file (`text`: a line of it, `where` naming that line), which must be a `kind`
    (a JSON object by default), or a one-line error naming the file and what is wrong."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8") if text is None else text)
    except json.JSONDecodeError as err:
        raise LvlmlpError(f"{path}{where}: invalid JSON ({err.msg} at line {err.lineno}); a damaged result: "
                          "run the command that wrote it again") from None
    except UnicodeDecodeError:
        raise LvlmlpError(f"{path}{where}: not UTF-8 text") from None
    except FileNotFoundError:
        raise LvlmlpError(f"{path}: missing") from None
    if not isinstance(doc, kind):
        raise LvlmlpError(f"{path}{where}: expected a JSON {'object' if kind is dict else kind.__name__}, "
                          f"got {type(doc).__name__}")
    return doc
