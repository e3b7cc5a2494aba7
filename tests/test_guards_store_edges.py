"""Guards of the feature store (extraction/store.py) written against its surviving mutants (docs/mutation-report.md):
merge of failures and of one whole run, the exact one-line errors of a damaged folder, manifest or shard set, and
the defaults of `Run.logits` and `merge_runs`. No model: every run here is written by `RunWriter` itself."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import lvlmlp
from lvlmlp import locking, open_run
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction import store
from lvlmlp.extraction.store import RunWriter, check_output_folder, is_complete_run, merge_runs

SETTINGS = {"model": "m", "dtype": "float32", "vocab_size": 3, "prompt_template": None, "max_new_tokens": 2}


def _arrays(rows: list[int]) -> dict[str, np.ndarray]:
    # each row's values depend on its input position only, so a merged run can be compared with `_arrays(all rows)`
    logits = np.arange(6, dtype=np.float32).reshape(1, 2, 3) + 100 * np.array(rows, dtype=np.float32)[:, None, None]
    return {"logits": logits, "n_tokens": np.full(len(rows), 2, dtype=np.int32), "row_index": np.array(rows)}


def _run(path: Path, rows: list[int], failed: tuple[int, ...] = (), shard: str | None = None, **extra) -> Path:
    settings = {**SETTINGS, **extra, **({"shard": shard, "data_hash": "h"} if shard else {})}
    w = RunWriter(path, settings, shard_size=2)
    w.append([{"id": f"r{i}"} for i in rows], _arrays(rows))
    for i in failed:
        w.fail(f"r{i}", f"row {i}: unreadable image")
    return w.close().path


def test_merge_keeps_every_shards_failures_and_copies_one_whole_run(tmp_path: Path):
    """Catches: failures dropped, mis-keyed or doubled by merge, one whole (unsharded) run refused or read as two,
    the output's shard size not the chunk asked for (default 256)."""
    s0 = _run(tmp_path / "s0", [0, 3], failed=(1,), shard="0/2")
    s1 = _run(tmp_path / "s1", [2, 5], failed=(4,), shard="1/2")
    merged = merge_runs([s1, s0], tmp_path / "m", chunk=3)
    assert merged.ids == ["r0", "r2", "r3", "r5"]
    assert sorted(merged.failures, key=lambda f: f["id"]) == [{"id": "r1", "error": "row 1: unreadable image"},
                                                              {"id": "r4", "error": "row 4: unreadable image"}]
    assert merged.manifest["n_failed"] == 2 and merged.manifest["shard_size"] == 3
    np.testing.assert_array_equal(merged.logits(1), _arrays([0, 2, 3, 5])["logits"][:, 1])
    assert merge_runs([s1, s0], tmp_path / "m", chunk=3).failures == merged.failures  # finished: nothing added
    whole = _run(tmp_path / "whole", [0, 1, 2], failed=(3,))
    copy = merge_runs([whole], tmp_path / "copy")
    assert copy.ids == ["r0", "r1", "r2"] and copy.failures == [{"id": "r3", "error": "row 3: unreadable image"}]
    assert copy.manifest["shard_size"] == 256
    for name in ("logits", "n_tokens", "row_index"):
        np.testing.assert_array_equal(np.load(copy.path / f"{name}.npy"), np.load(whole / f"{name}.npy"))


def test_merge_messages_name_the_run_and_the_shard(tmp_path: Path):
    """Catches: the merge errors losing what they name (the run, the shard spec, the settings that differ)."""
    with pytest.raises(LvlmlpError, match="^merge: no run folders given$"):
        merge_runs([], tmp_path / "m")
    a = _run(tmp_path / "a", [0], shard="0/2")
    b = _run(tmp_path / "b", [1], shard="1/2", model="other", vocab_size=3, dtype="float16")
    with pytest.raises(LvlmlpError, match=re.escape(f"merge: {b} was made with other settings (dtype, model differ)")):
        merge_runs([a, b], tmp_path / "m")
    whole = _run(tmp_path / "whole", [1])
    with pytest.raises(LvlmlpError, match=re.escape(f"merge: {whole} is not a shard of `extract --shard I/N` "
                                                    "(shard: None)")):
        merge_runs([a, whole], tmp_path / "m")
    third = _run(tmp_path / "third", [1], shard="1/3")
    with pytest.raises(LvlmlpError, match=re.escape(f"merge: {third} is shard 1/3 but another run is of 2 shards")):
        merge_runs([a, third], tmp_path / "m")
    again = _run(tmp_path / "again", [2], shard="0/2")
    with pytest.raises(LvlmlpError, match=re.escape(f"merge: shard 0/2 given twice ({a} and {again})")):
        merge_runs([a, again], tmp_path / "m")
    b_same = _run(tmp_path / "b2", [0], shard="1/2")
    with pytest.raises(LvlmlpError, match="^merge: the same input row appears in more than one run "
                                          r"\(overlapping shards\?\)$"):
        merge_runs([a, b_same], tmp_path / "m")


def test_reopening_a_folder_compares_keys_present_on_one_side_only(tmp_path: Path):
    """Catches: settings compared on the keys both runs have only (a new setting would silently reuse rows)."""
    _run(tmp_path / "r", [0, 1])
    with pytest.raises(LvlmlpError, match=re.escape(f"{tmp_path / 'r'}: holds a run with other settings (hidden "
                                                    "differ)")):
        RunWriter(tmp_path / "r", {**SETTINGS, "hidden": True})


def test_damaged_manifests_and_foreign_folders_are_named(tmp_path: Path):
    """Catches: the one-line errors of a non-JSON or non-object manifest, a file given as --out, a foreign folder
    (the first three names it holds, then '...') losing their text."""
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(LvlmlpError, match=re.escape(f"{tmp_path / 'bad' / 'manifest.json'}: not valid JSON (")):
        open_run(tmp_path / "bad")
    (tmp_path / "bad" / "manifest.json").write_text("[1, 2]")
    with pytest.raises(LvlmlpError, match=re.escape(f"{tmp_path / 'bad' / 'manifest.json'}: not a run manifest "
                                                    "(a JSON object is expected)") + "$"):
        open_run(tmp_path / "bad")
    (tmp_path / "file").write_text("x")
    with pytest.raises(LvlmlpError, match=re.escape(f"--out {tmp_path / 'file'}: exists and is not a folder") + "$"):
        check_output_folder(tmp_path / "file")
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("d.txt", "b.txt", "a.txt", "c.txt"):
        (mine / name).write_text("keep me")
    with pytest.raises(LvlmlpError, match=re.escape(f"--out {mine}: exists and is not an lvlmlp run folder (it holds "
                                                    "a.txt, b.txt, c.txt, ...); give an empty or new folder") + "$"):
        RunWriter(mine, SETTINGS)
    (mine / "d.txt").unlink()
    with pytest.raises(LvlmlpError, match=re.escape(f"--out {mine}: exists and is not an lvlmlp run folder (it holds "
                                                    "a.txt, b.txt, c.txt); give an empty or new folder") + "$"):
        check_output_folder(mine)
    (mine / "d.txt").write_text("keep me")
    with pytest.raises(LvlmlpError, match=re.escape(f"--run-dir {mine}: exists and is not an lvlmlp run folder")):
        check_output_folder(mine, what="--run-dir")
    assert sorted(p.name for p in mine.iterdir()) == ["a.txt", "b.txt", "c.txt", "d.txt"]


def test_a_shard_with_a_foreign_name_is_named(tmp_path: Path):
    """Catches: the error for a file in shards/ that lvlmlp did not name losing its text."""
    w = RunWriter(tmp_path / "r", SETTINGS, shard_size=2)
    w.append([{"id": "r0"}, {"id": "r1"}], _arrays([0, 1]))
    w.release()
    shard = next((tmp_path / "r" / "shards").glob("*.safetensors"))
    shutil.copy(shard, shard.with_name("copy.safetensors"))  # a valid shard under a name lvlmlp never writes
    with pytest.raises(LvlmlpError, match=re.escape(f"{shard.with_name('copy.safetensors')}: not a shard lvlmlp "
                                                    "wrote (unexpected name); move it out of the folder") + "$"):
        RunWriter(tmp_path / "r", SETTINGS, shard_size=2)


def test_run_logits_default_to_the_first_token_and_layer_message_without_layers(tmp_path: Path):
    """Catches: `Run.logits()` defaulting to another token, the layer error without its 'none'."""
    run = open_run(_run(tmp_path / "r", [0, 1]))
    np.testing.assert_array_equal(run.logits(), _arrays([0, 1])["logits"][:, 0])
    with pytest.raises(LvlmlpError, match=re.escape(f"{run.path}: layer 0 not extracted (have none)") + "$"):
        run.layer(0)
    assert json.loads((run.path / "manifest.json").read_text())["n_rows"] == 2


# ------------------------------------------------------------------------------------------------ writer, lock
def _open_shards(path: Path) -> list[Path]:
    return sorted((path / "shards").glob("*.safetensors"))


def test_new_manifest_fields_shard_sizes_and_a_second_close(tmp_path: Path):
    """Catches: the manifest of a run in progress without `complete: false`, a version or a UTC creation time;
    the default shard size; a batch that crosses a half-filled shard making a shard larger than `shard_size`;
    settings or meta that JSON cannot hold natively (a Path) refused; a second close() consolidating again."""
    w = RunWriter(tmp_path / "r", {**SETTINGS, "model": tmp_path / "ckpt"}, shard_size=2)
    doc = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert doc["complete"] is False and doc["lvlmlp_version"] == lvlmlp.__version__ and doc["shard_size"] == 2
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", doc["created_at"]) and doc["model"] == str(
        tmp_path / "ckpt")
    w.append([{"id": "r0", "source": tmp_path / "a.png"}], _arrays([0]))
    w.append([{"id": f"r{i}"} for i in (1, 2, 3)], _arrays([1, 2, 3]))  # fills the half shard, then one more
    assert len(_open_shards(tmp_path / "r")) == 2 and len(w._buf_meta) == 0
    run = w.close()
    assert run.meta[0]["source"] == str(tmp_path / "a.png") and run.ids == ["r0", "r1", "r2", "r3"]
    assert w.close().ids == run.ids  # already complete: nothing redone
    w = RunWriter(tmp_path / "default", SETTINGS)
    assert json.loads((tmp_path / "default" / "manifest.json").read_text())["shard_size"] == 256
    w.release()


def test_rows_go_in_input_order_by_row_index_or_in_append_order_without_it(tmp_path: Path):
    """Catches: the committed row_index ignored (rows in arrival order) or required."""
    w = RunWriter(tmp_path / "r", SETTINGS, shard_size=2)
    for rows in ([3, 1], [2, 0]):  # batches arriving out of order, as from parallel workers
        w.append([{"id": f"r{i}"} for i in rows], _arrays(rows))
        w.fail(f"x{rows[0]}", "bad image")
        w._flush()  # a shard holding a failure only, between the row shards
    run = w.close()
    assert run.ids == ["r0", "r1", "r2", "r3"] and len(run.failures) == 2
    np.testing.assert_array_equal(run.logits(0), _arrays([0, 1, 2, 3])["logits"][:, 0])
    assert run.logits(0).dtype == np.float32 and run.n_tokens.dtype == np.int32 and run.row_index.dtype == np.int64
    w = RunWriter(tmp_path / "plain", SETTINGS, shard_size=2)
    w.append([{"id": "b"}, {"id": "a"}, {"id": "c"}], {"logits": np.zeros((3, 2, 3), dtype=np.float32),
                                                      "last_logits": np.eye(3, dtype=np.float32)})
    run = w.close()
    assert run.ids == ["b", "a", "c"]
    np.testing.assert_array_equal(run.last_logits(), np.eye(3))


def test_failures_alone_are_committed_and_resumed(tmp_path: Path):
    """Catches: failures buffered after the last full shard lost at close, failed rows redone on resume, the
    check of expected ids skipped, a resumed run keeping the old device instead of the new one."""
    w = RunWriter(tmp_path / "r", {**SETTINGS, "device": "cpu"}, shard_size=2)
    w.append([{"id": "r0"}, {"id": "r1"}], _arrays([0, 1]))
    w.fail("r2", "bad image")
    w._flush()
    w.release()
    w = RunWriter(tmp_path / "r", {**SETTINGS, "device": "cuda:1"}, shard_size=2)
    assert w.done_ids == {"r0", "r1", "r2"}
    w.fail("r3", "bad question")
    with pytest.raises(LvlmlpError, match=re.escape("row 'r4' is missing (1 missing, 0 unexpected)")):
        w.close(["r0", "r1", "r2", "r3", "r4"])
    w = RunWriter(tmp_path / "r", {**SETTINGS, "device": "cuda:1"}, shard_size=2)
    run = w.close(["r0", "r1", "r2", "r3"])
    assert run.failures == [{"id": "r2", "error": "bad image"}, {"id": "r3", "error": "bad question"}]
    assert run.manifest["device"] == "cuda:1"


def test_append_message_and_settings_message(tmp_path: Path):
    """Catches: the row-count and other-settings messages losing what they name."""
    w = RunWriter(tmp_path / "r", SETTINGS, shard_size=2)
    with pytest.raises(ValueError, match=re.escape("array 'logits' has 3 rows for 2 metadata rows")):
        w.append([{"id": "a"}, {"id": "b"}], {"logits": np.zeros((3, 2, 3), dtype=np.float32)})
    w.release()
    with pytest.raises(LvlmlpError, match=re.escape(f"{tmp_path / 'r'}: holds a run with other settings (dtype, model "
                                                    "differ); use another --out or delete the folder") + "$"):
        RunWriter(tmp_path / "r", {**SETTINGS, "model": "x", "dtype": "bfloat16"})


def test_tampered_shard_meta_or_data_fails_its_checksum(tmp_path: Path):
    """Catches: the checksum leaving out the rows' meta, the failures or the arrays, or not being stored."""
    for part in ("meta", "failures", "data"):
        w = RunWriter(tmp_path / part, SETTINGS, shard_size=2)
        w.append([{"id": "r0"}, {"id": "r1"}], _arrays([0, 1]))
        w.fail("r9", "bad")
        w._flush()
        w.release()
        shard = _open_shards(tmp_path / part)[-1 if part == "failures" else 0]  # the failure has a shard of its own
        with safe_open(str(shard), framework="np") as f:
            header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        assert "sha256" in header
        if part == "data":
            tensors["logits"][0, 0, 0] += 1
        else:
            header[part] = header[part].replace("r", "x")
        save_file(tensors, str(shard), metadata=header)
        with pytest.raises(LvlmlpError, match=re.escape(f"{shard}: shard contents do not match its checksum")):
            RunWriter(tmp_path / part, SETTINGS, shard_size=2)


def test_full_disk_names_the_run_folder_and_leaves_no_temporary_shard(tmp_path: Path, monkeypatch):
    """Catches: the full-disk error naming no folder, or hidden by the clean-up of a shard never written."""
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    w = RunWriter(tmp_path / "r", SETTINGS, shard_size=2)
    monkeypatch.setattr(store, "save_file", full)
    with pytest.raises(LvlmlpError, match=re.escape(f"{tmp_path / 'r'}: no space left on device")):
        w.append([{"id": "r0"}, {"id": "r1"}], _arrays([0, 1]))
    w.release()
    assert list((tmp_path / "r" / "shards").iterdir()) == []


def test_lock_names_its_holder_is_private_and_is_dropped_by_a_forked_child(tmp_path: Path, monkeypatch):
    """Catches: the in-use message without its holder (pid, host, UTC time, command), the lock file's mode, a
    nested folder not created, a released or child-forgotten descriptor still tracked or unlocked twice."""
    monkeypatch.setattr(sys, "argv", ["/usr/bin/lvlmlp", "extract", "--out", "b"])  # the holder's command line
    folder = tmp_path / "a" / "b"
    lock = locking.FolderLock(folder)
    assert (folder / locking.LOCK_NAME).stat().st_mode & 0o777 == 0o644 & ~_umask()
    command = "lvlmlp extract --out b"
    with pytest.raises(LvlmlpError) as err:
        locking.FolderLock(folder)
    assert re.fullmatch(re.escape(f"{folder}: in use by pid {os.getpid()} on {socket.gethostname()} since ")
                        + r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00"
                        + re.escape(f" ({command}); wait for it to finish (or stop it) and re-run"), str(err.value))
    fd = lock._fd
    lock.release()
    assert fd not in locking._HELD_LOCKS
    lock.release()  # twice is harmless
    (folder / locking.LOCK_NAME).write_text("")  # a lock file whose holder wrote nothing
    held = locking.FolderLock(folder)
    with open(folder / locking.LOCK_NAME, "r+") as fh:
        fh.truncate(0)
    with pytest.raises(LvlmlpError, match=re.escape(f"{folder}: in use by another process;")):
        locking.FolderLock(folder)
    locking.forget_inherited_locks()  # what a forked child does: its copy closed, not unlocked
    assert locking._HELD_LOCKS == set()
    held.release()  # the child's lock object must not unlock or close a descriptor it no longer has
    locking.FolderLock(folder).release()  # the lock is free: its only descriptor was closed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_is_complete_run_compares_the_identity_and_honours_ignore(tmp_path: Path):
    """Catches: is_complete_run true for a missing, unfinished or differently-made run, or blind to `ignore`."""
    assert not is_complete_run(tmp_path / "none", SETTINGS)
    w = RunWriter(tmp_path / "r", {**SETTINGS, "model": tmp_path / "ckpt"}, shard_size=2)
    w.append([{"id": "r0"}], _arrays([0]))
    w._flush()
    assert not is_complete_run(tmp_path / "r", {**SETTINGS, "model": tmp_path / "ckpt"})  # not finished
    w.close()
    assert is_complete_run(tmp_path / "r", {**SETTINGS, "model": tmp_path / "ckpt", "device": "cuda"})
    assert not is_complete_run(tmp_path / "r", {**SETTINGS, "model": tmp_path / "ckpt", "max_new_tokens": 3})
    assert is_complete_run(tmp_path / "r", {**SETTINGS, "model": tmp_path / "ckpt", "max_new_tokens": 3},
                           ignore=("max_new_tokens",))


# ------------------------------------------------------------------------------------------------ damaged folders
DAMAGED = "the run folder is damaged (extract it again)"
REMEDY = "delete this file and re-run the same command: its rows will be done again"


def _safetensors_error(path: Path) -> str:
    """The first line of what safetensors itself says about a damaged file."""
    with pytest.raises(Exception) as err:
        with safe_open(str(path), framework="np") as f:
            [f.get_tensor(k) for k in f.keys()]
    return str(err.value).splitlines()[0]


def test_damaged_run_folders_are_named_with_their_remedy(tmp_path: Path):
    """Catches: the one-line errors of a damaged run folder (meta missing or short, a row without an id, an array
    truncated, unreadable or of another vocabulary) losing what they name, or an array's rows read on another
    axis (logits are token-major)."""
    def fresh(name: str) -> Path:
        return _run(tmp_path / name, [0, 1, 2])

    r = fresh("meta")
    (r / "meta.jsonl").unlink()
    with pytest.raises(LvlmlpError, match=re.escape(f"{r / 'meta.jsonl'}: missing; {DAMAGED}") + "$"):
        open_run(r)
    r = fresh("short")
    (r / "meta.jsonl").write_text('{"id": "r0"}\n{"id": "r1"}\n')
    with pytest.raises(LvlmlpError, match=re.escape(f"{r / 'meta.jsonl'}: 2 rows, the manifest says 3; {DAMAGED}")
                       + "$"):
        open_run(r)
    r = fresh("noid")
    (r / "meta.jsonl").write_text('{"id": "r0"}\n{"id": 1}\n{"id": "r2"}\n')
    with pytest.raises(LvlmlpError, match=re.escape(f"{r / 'meta.jsonl'}: row 2 has no string 'id'") + "$"):
        open_run(r)
    r = fresh("rows")
    np.save(r / "n_tokens.npy", np.ones(2, dtype=np.int32))
    with pytest.raises(LvlmlpError, match=re.escape(f"{r / 'n_tokens.npy'}: holds 2 rows but meta.jsonl has 3; "
                                                    f"{DAMAGED}") + "$"):
        open_run(r)
    r = fresh("scalar")
    np.save(r / "row_index.npy", np.int64(3))
    with pytest.raises(LvlmlpError, match=re.escape(f"{r / 'row_index.npy'}: holds -1 rows but meta.jsonl has 3")):
        open_run(r)
    r = fresh("unreadable")
    (r / "logits.npy").write_bytes(b"\x93NUMPY garbage\nsecond line")
    with pytest.raises(ValueError) as numpy_says:
        np.load(r / "logits.npy", mmap_mode="r")
    first = str(numpy_says.value).splitlines()[0]
    with pytest.raises(LvlmlpError, match=re.escape(f"{r / 'logits.npy'}: unreadable array ({first}); {DAMAGED}")
                       + "$"):
        open_run(r)
    r = fresh("vocab")
    np.save(r / "logits.npy", np.zeros((2, 3, 4), dtype=np.float32))
    with pytest.raises(LvlmlpError, match=re.escape(f"{r / 'logits.npy'}: 4 logits per row, the manifest says "
                                                    "vocab_size 3") + "$"):
        open_run(r)
    run = open_run(fresh("ok"))  # logits (K=2, N=3, V=3): rows on axis 1, and K != N so the axis matters
    assert np.load(run.path / "logits.npy", mmap_mode="r").shape == (2, 3, 3)


def test_corrupt_and_doubled_shards_are_named(tmp_path: Path):
    """Catches: a corrupt shard's message without the file, the reason's first line or the remedy; a row in two
    shards named without the row or the two files; the ids check reporting the wrong row or count."""
    w = RunWriter(tmp_path / "r", SETTINGS, shard_size=2)
    w.append([{"id": "r0"}, {"id": "r1"}], _arrays([0, 1]))
    w.release()
    shard = _open_shards(tmp_path / "r")[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(LvlmlpError, match=re.escape(f"{shard}: corrupt shard ({_safetensors_error(shard)}); {REMEDY}")
                       + "$"):
        RunWriter(tmp_path / "r", SETTINGS, shard_size=2)
    shard.write_bytes(data)
    shutil.copy(shard, shard.with_name("000007.safetensors"))  # the same rows committed twice
    w = RunWriter(tmp_path / "r", SETTINGS, shard_size=2)
    with pytest.raises(LvlmlpError, match=re.escape(f"{tmp_path / 'r'}: row 'r0' is in two shards (000000.safetensors "
                                                    "and 000007.safetensors); remove one of them and re-run the same "
                                                    "command") + "$"):
        w.close()
    shard.with_name("000007.safetensors").unlink()
    w = RunWriter(tmp_path / "r", SETTINGS, shard_size=2)
    w.append([{"id": "x1"}, {"id": "x2"}, {"id": "r2"}], _arrays([5, 6, 2]))
    with pytest.raises(LvlmlpError, match=re.escape(f"{tmp_path / 'r'}: row 'r3' is missing (2 missing, 2 unexpected);"
                                                    " the run is not marked complete; re-run the same command") + "$"):
        w.close(["r0", "r1", "r2", "r3", "r4"])
    w = RunWriter(tmp_path / "r", SETTINGS, shard_size=2)
    with pytest.raises(LvlmlpError, match=re.escape(f"{tmp_path / 'r'}: row 'x1' is not in the input (0 missing, 2 "
                                                    "unexpected)")):
        w.close(["r0", "r1", "r2"])
    w = RunWriter(tmp_path / "r", SETTINGS, shard_size=2)
    w.fail("r9", "bad image")  # a failed row counts as done
    assert w.close(["r0", "r1", "r2", "x1", "x2", "r9"]).failures == [{"id": "r9", "error": "bad image"}]
    w = RunWriter(tmp_path / "pos", SETTINGS, shard_size=2)
    w.append([{"id": "a"}, {"id": "b"}], _arrays([0, 0]))  # two rows claiming one input position
    with pytest.raises(LvlmlpError, match=re.escape(f"{tmp_path / 'pos'}: two shards hold rows of the same input "
                                                    "position; the run is not complete") + "$"):
        w.close()


def test_a_shard_damaged_before_close_stale_temporaries_and_exact_array_files(tmp_path: Path, monkeypatch):
    """Catches: a shard damaged between commit and close() named without safetensors' own reason; stale or
    half-written `*.npy.tmp` files left behind; a full disk during consolidation naming no folder; final arrays
    with bytes beyond their data."""
    w = RunWriter(tmp_path / "r", SETTINGS, shard_size=2)
    w.append([{"id": "r0"}, {"id": "r1"}], _arrays([0, 1]))
    shard = _open_shards(tmp_path / "r")[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:40])
    with pytest.raises(LvlmlpError, match=re.escape(f"{shard}: corrupt shard ({_safetensors_error(shard)}); {REMEDY}")
                       + "$"):
        w.close()

    shard.write_bytes(data)
    with safe_open(str(shard), framework="np") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["logits"][1, 1, 1] = -1  # header and row_index intact: only the copy's checksum sees it
    save_file(tensors, str(shard), metadata=header)
    w = RunWriter(tmp_path / "r2", SETTINGS, shard_size=2)
    w.append([{"id": "r0"}, {"id": "r1"}], _arrays([0, 1]))
    shutil.copy(shard, _open_shards(tmp_path / "r2")[0])
    with pytest.raises(LvlmlpError, match="shard contents do not match its checksum"):
        w.close()
    assert list((tmp_path / "r2").glob("*.npy.tmp")) == [] and list((tmp_path / "r2").glob("*.npy")) == []

    w = RunWriter(tmp_path / "r3", SETTINGS, shard_size=2)
    w.append([{"id": "r0"}, {"id": "r1"}], _arrays([0, 1]))
    (tmp_path / "r3" / "logits.npy.tmp").write_bytes(b"left by a killed consolidation")

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "posix_fallocate", full)
        with pytest.raises(LvlmlpError, match=re.escape(f"{tmp_path / 'r3'}: no space left on device")):
            w.close()
    w = RunWriter(tmp_path / "r3", SETTINGS, shard_size=2)
    # left by a killed consolidation of an array this run does not write (so not overwritten by this one)
    (tmp_path / "r3" / "hidden.npy.tmp").write_bytes(b"left by a killed consolidation")
    run = w.close()
    assert list(run.path.glob("*.tmp")) == [] and not (run.path / "shards").exists()
    for path in run.path.glob("*.npy"):
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            shape, _, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                               np.lib.format.read_array_header_2_0)(fh)
            assert path.stat().st_size == fh.tell() + int(np.prod(shape)) * dtype.itemsize, path.name
