"""Extraction end to end on a tiny real LLaVA: exactness vs per-sample generate, resume after SIGKILL, shards,
and bad input (one-line errors, nothing half-written)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from lvlmlp import open_run
from lvlmlp.cli import main
from lvlmlp.data import images_fingerprint, load_image, rows_fingerprint
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.backend import Backend
from lvlmlp.extraction.extract import (
    backend_settings,
    extract,
    finished_run,
    parse_shard,
    run_settings,
    shard_rows,
)
from lvlmlp.extraction.options import ExtractOptions, flag_names


def make_manifest(root: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        h, w = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        question = " ".join(["what", "is", "the", "colour", "of", "this", "shape"][: 2 + i % 6]) + "?"
        lines.append({"id": f"r{i}", "image": f"img/{i}.png", "question": question, "label": i % 2, "extra": i})
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def reference(ckpt: Path, manifest: Path, k: int) -> tuple[list[np.ndarray], list[str]]:
    """Independent per-sample greedy generate with raw logits, through the Auto classes."""
    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    proc = AutoProcessor.from_pretrained(ckpt)
    logits, texts = [], []
    for line in manifest.read_text().splitlines():
        row = json.loads(line)
        image = Image.open(manifest.parent / row["image"]).convert("RGB")
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}]
        prompt = proc.apply_chat_template(conv, add_generation_prompt=True)
        inputs = proc(images=[image], text=[prompt], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=k, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        logits.append(torch.stack([x[0] for x in out.logits]).float().numpy())
        new = out.sequences[0, inputs["input_ids"].shape[1]:]
        texts.append(proc.tokenizer.decode(new, skip_special_tokens=True))
    return logits, texts


def test_batched_extract_equals_per_sample_generate(tiny_ckpt, tmp_path):
    ckpt = tiny_ckpt("llava")
    manifest = make_manifest(tmp_path, 6)
    ref_logits, ref_texts = reference(ckpt, manifest, k=3)
    base = ["extract", "--model", str(ckpt), "--data", str(manifest), "--batch-size", "4", "--device", "cpu",
            "--store-dtype", "float32", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "first"), "--hidden", "--layers", "0,-1"]) == 0
    run = open_run(tmp_path / "first")
    assert run.ids == [f"r{i}" for i in range(6)]
    assert run.meta[3] == {"id": "r3", "question": run.meta[3]["question"], "label": 1, "extra": 3}
    for i in range(6):
        np.testing.assert_allclose(run.logits(0)[i], ref_logits[i][0], atol=1e-4, rtol=0)
    assert run.manifest["vocab_size"] == run.logits(0).shape[1]
    # the head is a plain linear map: logits reconstruct from the stored final-norm hidden state
    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    with torch.inference_mode():
        rebuilt = model.get_output_embeddings()(torch.from_numpy(np.array(run.hidden()))).numpy()
    np.testing.assert_allclose(rebuilt, run.logits(0), atol=1e-4, rtol=0)
    assert run.layer(-1).shape == run.hidden().shape

    assert main([*base, "--out", str(tmp_path / "gen"), "--max-new-tokens", "3"]) == 0
    gen = open_run(tmp_path / "gen")
    assert gen.responses == ref_texts
    for i in range(6):
        n = int(gen.n_tokens[i])
        assert n == len(ref_logits[i])
        for t in range(3):
            if t < n:
                np.testing.assert_allclose(gen.logits(t)[i], ref_logits[i][t], atol=1e-4, rtol=0)
            else:
                assert not gen.logits(t)[i].any()  # padding, explicitly zero


def _arrays(run_dir: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.load(p) for p in sorted(run_dir.glob("*.npy"))}


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()  # a zombie has exited
    except FileNotFoundError:
        return False


def _kill_midway(argv: list[str], shards: Path, after: int, sig: int = signal.SIGKILL, stderr: Path | None = None) -> int:
    """Run `lvlmlp ARGV` in a forked copy of this process (torch and the model code already imported, where a fresh
    interpreter spent ~6 s of CPU importing them), send `sig` once `after` shards are committed, and return its exit
    code (minus the signal's number when the signal ended it). Its data-loader workers (orphaned, after SIGKILL) must
    be gone within a few seconds. `stderr`: a file for what the command prints there."""
    pid = os.fork()
    if pid == 0:  # the child: the command as a user runs it, its output kept away from pytest's (and xdist's pipes)
        code = 1
        try:
            # a Python handler (pytest's) would catch Ctrl-C before the command does: the default, as in a terminal
            signal.signal(signal.SIGINT, signal.default_int_handler)
            null = os.open(os.devnull, os.O_RDWR)
            err = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if stderr else null
            for fd, target in ((0, null), (1, null), (2, err)):
                os.dup2(target, fd)
            sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
            code = main(argv)
        finally:
            sys.stdout.flush(), sys.stderr.flush()  # os._exit (no pytest teardown in the copy) does not flush
            os._exit(code)
    deadline = time.time() + 120
    workers: list[int] = []
    status = None
    while status is None and time.time() < deadline:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
        elif len(list(shards.glob("*.safetensors"))) >= after:
            workers = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
            os.kill(pid, sig)
            break
        else:
            time.sleep(0.01)
    code = os.waitstatus_to_exitcode(status if status is not None else os.waitpid(pid, 0)[1])
    assert workers, "no data-loader worker was running"
    deadline = time.time() + 10
    while any(_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    lingering = [pid for pid in workers if _alive(pid)]
    for pid in lingering:  # so that a failure here does not leave them running (holding pytest's pipes)
        os.kill(pid, signal.SIGKILL)
    assert not lingering, "orphaned data-loader workers kept running"
    return code


def test_sigkill_and_ctrl_c_then_resume_equal_the_uninterrupted_run_also_for_shards(tiny_ckpt, tmp_path):
    """A run SIGKILLed after 3 of its 20 shards resumes to the uninterrupted run's arrays; a `--shard 1/2` part
    interrupted by Ctrl-C (SIGINT) stops its workers, says one line, exit 130, and resumes too; its parts merge to
    the same arrays."""
    ckpt = tiny_ckpt("llava")
    manifest = make_manifest(tmp_path, 40, seed=1)  # killed after 3 of 20 shards: most rows are left to resume
    base = ["extract", "--model", str(ckpt), "--data", str(manifest), "--batch-size", "2", "--shard-size", "2",
            "--device", "cpu", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "clean")]) == 0
    clean = open_run(tmp_path / "clean")

    code = _kill_midway([*base, "--out", str(tmp_path / "killed")], tmp_path / "killed" / "shards", after=3)
    assert code == -signal.SIGKILL, "extraction finished before it could be killed"
    assert not (tmp_path / "killed" / "logits.npy").exists()
    assert main([*base, "--out", str(tmp_path / "killed")]) == 0
    resumed = open_run(tmp_path / "killed")
    assert resumed.ids == clean.ids and resumed.meta == clean.meta
    for name, arr in _arrays(tmp_path / "clean").items():
        np.testing.assert_array_equal(_arrays(tmp_path / "killed")[name], arr)

    code = _kill_midway([*base, "--shard", "1/2", "--out", str(tmp_path / "s1")], tmp_path / "s1" / "shards", 2,
                        sig=signal.SIGINT, stderr=tmp_path / "stderr.txt")
    assert code == 130, "extraction finished before it could be interrupted"
    last = (tmp_path / "stderr.txt").read_text().strip().splitlines()[-1]
    assert last == "lvlmlp: interrupted; what was committed is kept, the same command resumes from there"
    for part in ("0/2", "1/2"):
        assert main([*base, "--shard", part, "--out", str(tmp_path / f"s{part[0]}")]) == 0
    assert main(["merge", str(tmp_path / "s1"), str(tmp_path / "s0"), "--out", str(tmp_path / "merged")]) == 0
    merged = open_run(tmp_path / "merged")
    assert merged.ids == clean.ids and merged.meta == clean.meta
    for name, arr in _arrays(tmp_path / "clean").items():
        np.testing.assert_array_equal(_arrays(tmp_path / "merged")[name], arr)


def test_rerun_with_other_settings_is_refused(tiny_ckpt, tmp_path, capsys):
    ckpt = tiny_ckpt("llava")
    manifest = make_manifest(tmp_path, 2)
    base = ["extract", "--model", str(ckpt), "--data", str(manifest), "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(base) == 0
    capsys.readouterr()
    assert main([*base, "--prompt-template", "{question} Answer briefly."]) == 2
    assert "prompt_template" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("missing", "row 'r1': image not found"),
        ("truncated", "row 'r1': unreadable image"),
        ("empty", "row 'r1': missing or empty 'question'"),
        ("duplicate", "duplicate id 'r0'"),
        ("notjson", "data.jsonl:2: line is not JSON"),
    ],
)
def test_bad_input_gives_one_line_error_and_no_partial_shard(tiny_ckpt, tmp_path, capsys, problem, message):
    ckpt = tiny_ckpt("llava")
    manifest = make_manifest(tmp_path, 3)
    lines = manifest.read_text().splitlines()
    row = json.loads(lines[1])
    if problem == "missing":
        (tmp_path / row["image"]).unlink()
    elif problem == "truncated":
        data = (tmp_path / row["image"]).read_bytes()
        (tmp_path / row["image"]).write_bytes(data[: len(data) // 2])
    elif problem == "empty":
        row["question"] = ""
    elif problem == "duplicate":
        row["id"] = "r0"
    lines[1] = "{oops" if problem == "notjson" else json.dumps(row)
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    capsys.readouterr()
    code = main(["extract", "--model", str(ckpt), "--data", str(manifest), "--out", str(out), "--batch-size", "1",
                 "--shard-size", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not list(out.glob("shards/*.tmp")) and not (out / "logits.npy").exists()
    committed = list(out.glob("shards/*.safetensors"))
    assert len(committed) == (1 if problem == "truncated" else 0)  # only whole shards of rows before the bad one


def _damaged_pngs(path: Path) -> dict[str, bytes]:
    """The PNG at `path`, damaged inside chunks that are whole: what libpng fails on mid-image (torchvision 0.29.1's
    `decode_png` then crashed the process: why PNG rows are decoded by libspng, docs/benchmarks.md, fourth pass)."""
    import zlib

    from tests.extraction.test_png import png_chunks, png_file

    chunks = png_chunks(path.read_bytes())
    raw = bytearray(zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT")))

    def png(pixel_rows: bytes) -> bytes:
        return png_file([chunks[0], (b"IDAT", zlib.compress(pixel_rows)), (b"IEND", b"")])

    bad_checksum = bytearray(png(bytes(raw)))
    bad_checksum[-13] ^= 1  # the image data's checksum ends where the 12 bytes of IEND begin
    bad_filter = bytearray(raw)
    bad_filter[0] = 9  # row 0's filter type: 0-4 exist
    return {
        "bad image-data checksum": bytes(bad_checksum),
        "bad filter byte": png(bytes(bad_filter)),
        "deflate data cut short": png(bytes(raw[: len(raw) // 2])),
    }


def test_damaged_pngs_with_whole_chunks_fail_their_rows_and_nothing_else(tiny_ckpt, tmp_path):
    """A row whose pixels cannot be decoded fails with its one-line error, in the data-loader worker as in this
    process, and the run goes on; a wrong image-data checksum over intact data is read (PIL does not check it)."""
    from lvlmlp.data import read_manifest
    from lvlmlp.extraction.backend import Backend
    from lvlmlp.extraction.extract import extract

    rows = read_manifest(make_manifest(tmp_path, 6))
    damaged = _damaged_pngs(Path(rows[0]["image"]))
    for i, body in zip((1, 3, 4), damaged.values()):
        Path(rows[i]["image"]).write_bytes(body)
    backend = Backend(tiny_ckpt("llava"), device="cpu")
    for workers in (1, 0):
        run = extract(backend, rows, tmp_path / f"w{workers}", batch_size=2, on_error="skip", workers=workers,
                      progress=False)
        assert run.ids == ["r0", "r1", "r2", "r5"]
        assert [(f["id"], f["error"].split(":")[0]) for f in run.failures] == [("r3", "row 'r3'"), ("r4", "row 'r4'")]
        assert all("unreadable image" in f["error"] and "\n" not in f["error"] for f in run.failures)


def test_on_error_skip_records_failures(tiny_ckpt, tmp_path):
    ckpt = tiny_ckpt("llava")
    manifest = make_manifest(tmp_path, 4)
    (tmp_path / "img" / "2.png").unlink()
    out = tmp_path / "run"
    assert main(["extract", "--model", str(ckpt), "--data", str(manifest), "--out", str(out), "--on-error", "skip",
                 "--no-progress"]) == 0
    run = open_run(out)
    assert run.ids == ["r0", "r1", "r3"]
    assert [f["id"] for f in run.failures] == ["r2"] and "image not found" in run.failures[0]["error"]


def test_lvlmlp_extract_checks_its_rows_once_before_the_model_loads(tiny_ckpt, tmp_path, monkeypatch):
    """One row check on the command line: `lvlmlp extract` checks the rows before it loads the model and `extract`
    takes the checked rows as they are; rows not yet checked (a Python caller's) are checked by `extract` itself.
    Catches: the rows checked twice (by the command and again by extract), or after the model load."""
    import lvlmlp.extraction.extract as ex
    from lvlmlp.extraction.spec import BackendSpec

    events: list[tuple[str, int]] = []
    check, build = ex.check_rows, BackendSpec.build

    def counted_check(rows, *args):
        events.append(("check", len(rows)))
        return check(rows, *args)

    def counted_build(spec, *args, **kwargs):
        events.append(("load", 0))
        return build(spec, *args, **kwargs)

    monkeypatch.setattr(ex, "check_rows", counted_check)
    monkeypatch.setattr(BackendSpec, "build", counted_build)
    manifest = make_manifest(tmp_path, 3)
    assert main(["extract", "--model", str(tiny_ckpt("llava")), "--data", str(manifest), "--out",
                 str(tmp_path / "run"), "--no-progress"]) == 0
    assert events == [("check", 3), ("load", 0)]
    rows = ex.checked_rows([{"id": 7, "image": str(tmp_path / "img" / "0.png"), "question": "q?"}], "src", "fail")
    assert isinstance(rows, ex.CheckedRows) and rows == [{"id": "7", "image": str(tmp_path / "img" / "0.png"),
                                                          "question": "q?", "_row_index": 0}]
    assert ex.checked_rows(rows, "src", "fail") is rows and ex.numbered_rows(rows, "src", "fail") is rows
    assert events[2:] == [("check", 1)]


def test_not_a_vision_language_checkpoint(tmp_path, capsys):
    manifest = make_manifest(tmp_path, 1)
    (tmp_path / "empty_model").mkdir()
    capsys.readouterr()
    code = main(["extract", "--model", str(tmp_path / "empty_model"), "--data", str(manifest), "--out",
                 str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "empty_model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_mathvista_labels_come_from_the_models_answers(tiny_ckpt, tmp_path, capsys):
    from lvlmlp.tasks.mathvista import check_answer

    root = tmp_path / "mathvista"  # the outputs beside it: an --out inside --data-root is refused
    (root / "images").mkdir(parents=True)
    records = {}
    for i in range(4):
        Image.new("RGB", (30 + 5 * i, 40), (50 * i, 20, 90)).save(root / "images" / f"{i}.jpg")
        records[str(i)] = {"pid": str(i), "image": f"images/{i}.jpg", "query": f"How many bars {i}?",
                           "answer": str(i), "question_type": "free_form", "answer_type": "integer",
                           "choices": None, "precision": None, "unit": None}
    (root / "testmini.json").write_text(json.dumps(records))
    base = ["extract", "--model", str(tiny_ckpt("llava")), "--task", "mathvista", "--data-root", str(root),
            "--no-progress"]
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "no")]) == 2
    assert "labels come from the model's answers" in capsys.readouterr().err
    assert main([*base, "--max-new-tokens", "3", "--out", str(tmp_path / "run")]) == 0
    run = open_run(tmp_path / "run")
    assert run.manifest["labels_from_responses"] is True
    expected = [int(check_answer(m["response"], {**records[m["id"]], "id": m["id"]})) for m in run.meta]
    np.testing.assert_array_equal(run.labels, expected)


def _run_contents(run_dir: Path) -> tuple[dict[str, np.ndarray], list[dict], list[dict]]:
    run = open_run(run_dir)
    return _arrays(run_dir), run.meta, run.failures


def _children() -> set[int]:
    """Child processes of this process, zombies included (Linux /proc)."""
    return {int(pid) for path in Path("/proc/self/task").glob("*/children") for pid in path.read_text().split()}


@pytest.mark.parametrize("transport", ["pipe", "shared buffers", "shared buffers too small"])
def test_worker_processes_give_exactly_the_inline_result(tiny_ckpt, tmp_path, monkeypatch, transport):
    """Batches prepared by forked workers (and by the main process when it would otherwise wait) come back in
    manifest order, failures included, bit for bit as when everything is prepared inline: through the pipe (the
    tiny model's small batches), through the workers' shared buffers (large batches), and through the pipe again for
    batches larger than the buffers (here a hundredth of the first batch: none fits)."""
    import lvlmlp.extraction.loader as loader
    from lvlmlp.data import read_manifest
    from lvlmlp.extraction.backend import Backend
    from lvlmlp.extraction.extract import extract

    sent: list[str] = []  # how each worker batch travelled
    if transport != "pipe":
        monkeypatch.setattr(loader, "SHARED_MIN_BYTES", 0)
        monkeypatch.setattr(loader, "SHARED_SLACK", 0.01 if "too small" in transport else 1.5)
        from_buffer = loader._from_buffer
        monkeypatch.setattr(loader, "_from_buffer", lambda buf, layout: (sent.append("shared"),
                                                                         from_buffer(buf, layout))[1])
    manifest = make_manifest(tmp_path, 11)
    (tmp_path / "img" / "4.png").unlink()
    backend = Backend(tiny_ckpt("llava"), device="cpu", dtype="float32")
    rows = read_manifest(manifest)
    children_before = _children()
    results = {
        workers: _run_contents(
            extract(backend, rows, tmp_path / f"w{workers}", batch_size=2, on_error="skip", progress=False,
                    workers=workers).path
        )
        for workers in (0, 1, 3)
    }
    # Every worker is reaped before extract returns: no finished (zombie) child is left for the caller's os.wait().
    assert _children() == children_before
    arrays0, meta0, failures0 = results[0]
    assert [m["id"] for m in meta0] == [f"r{i}" for i in range(11) if i != 4]
    assert [f["id"] for f in failures0] == ["r4"]
    for workers in (1, 3):
        arrays, meta, failures = results[workers]
        assert meta == meta0 and failures == failures0
        assert arrays.keys() == arrays0.keys()
        for name in arrays0:
            np.testing.assert_array_equal(arrays[name], arrays0[name])
    assert bool(sent) == (transport == "shared buffers")


def _interrupted_after_two_batches(monkeypatch, backend: Backend, rows: list[dict], out: Path, **options) -> None:
    """Extract `rows` into `out` two rows a batch and a shard, and stop as Ctrl-C would before the third batch: rows
    r0-r3 are committed."""
    import lvlmlp.extraction.extract as extract_module

    run_batch, calls = extract_module.run_batch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return run_batch(*args, **kwargs)

    monkeypatch.setattr(extract_module, "run_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract(backend, rows, out, batch_size=2, shard_size=2, progress=False, **options)
    monkeypatch.setattr(extract_module, "run_batch", run_batch)


def test_a_backend_without_its_weights_loads_them_once_its_workers_are_at_work(tiny_ckpt, tmp_path, monkeypatch):
    """`lvlmlp extract`'s way: the data-loader worker of a new run is forked from the backend before its weights load
    (it prepares batches meanwhile), and the run equals a loaded backend's bit for bit. A resumed run (its folder
    has shards) loads first, since what is left is known only from the folder; a load that fails stops the worker."""
    import lvlmlp.extraction.loader as loader
    from lvlmlp.data import read_manifest
    from lvlmlp.extraction.backend import Backend
    from lvlmlp.extraction.extract import extract

    rows = read_manifest(make_manifest(tmp_path, 9))
    ckpt = tiny_ckpt("llava")
    want = _run_contents(extract(Backend(ckpt, device="cpu"), rows, tmp_path / "loaded", batch_size=2,
                                 progress=False).path)
    before = _children()
    workers_at_load: list[int] = []
    load = Backend.load_weights

    def counted(self: Backend) -> None:
        workers_at_load.append(len(_children() - before))
        load(self)

    monkeypatch.setattr(Backend, "load_weights", counted)

    def same(run_dir: Path) -> None:
        arrays, meta, failures = _run_contents(run_dir)
        assert meta == want[1] and failures == want[2] and arrays.keys() == want[0].keys()
        for name in arrays:
            np.testing.assert_array_equal(arrays[name], want[0][name])

    light = Backend(ckpt, device="cpu", load_model=False)
    same(extract(light, rows, tmp_path / "new", batch_size=2, progress=False).path)
    assert workers_at_load == [1] and light.model is not None and _children() == before

    _interrupted_after_two_batches(monkeypatch, Backend(ckpt, device="cpu", load_model=False), rows,
                                   tmp_path / "resumed")
    assert any((tmp_path / "resumed").glob("shards/*")) and _children() == before
    same(extract(Backend(ckpt, device="cpu", load_model=False), rows, tmp_path / "resumed", batch_size=2,
                 shard_size=2, progress=False).path)
    assert workers_at_load == [1, 1, 0]  # the interrupted run's, then the resumed one's: loaded before any fork

    def failing(self: Backend) -> None:
        workers_at_load.append(len(_children() - before))
        raise LvlmlpError("the weights are unreadable")

    monkeypatch.setattr(Backend, "load_weights", failing)
    closed: list[int] = []
    close = loader.Started.close
    monkeypatch.setattr(loader.Started, "close", lambda self: (closed.append(1), close(self))[1])
    with pytest.raises(LvlmlpError, match="unreadable"):
        extract(Backend(ckpt, device="cpu", load_model=False), rows, tmp_path / "failed", batch_size=2, progress=False)
    # the worker it had started is stopped (not left to the garbage collector) and reaped
    assert workers_at_load[-1] == 1 and closed == [1] and _children() == before


def test_early_workers_serve_the_run_they_were_started_for_and_only_it(tiny_ckpt, tmp_path, monkeypatch):
    """The workers started before the weights load are the run's (one fork), and prepare its batches as the run's
    options say (the context check counts the tokens to generate). Without workers none are started early; and if
    rows got done in the folder meanwhile (another process's partial run), those batches are dropped for new ones."""
    import json
    import multiprocessing.context
    import shutil

    import lvlmlp.extraction.loader as loader
    from lvlmlp.data import read_manifest
    from lvlmlp.extraction.backend import Backend
    from lvlmlp.extraction.extract import extract

    rows = read_manifest(make_manifest(tmp_path, 9))
    ckpt = tiny_ckpt("llava")
    want = _run_contents(extract(Backend(ckpt, device="cpu"), rows, tmp_path / "loaded", batch_size=2,
                                 progress=False).path)
    forks: list[int] = []
    start = multiprocessing.context.ForkProcess.start
    monkeypatch.setattr(multiprocessing.context.ForkProcess, "start", lambda self: (forks.append(1), start(self))[1])
    started: list[int] = []
    init = loader.Started.__init__
    monkeypatch.setattr(loader.Started, "__init__", lambda self, *a, **k: (started.append(1), init(self, *a, **k))[1])

    def light() -> Backend:
        return Backend(ckpt, device="cpu", load_model=False)

    assert _run_contents(extract(light(), rows, tmp_path / "new", batch_size=2, progress=False).path)[1] == want[1]
    assert forks == [1] and started == [1]
    assert _run_contents(extract(light(), rows, tmp_path / "inline", batch_size=2, workers=0,
                                 progress=False).path)[1] == want[1]
    assert forks == [1] and started == [1]

    # Another process commits rows r0-r3 while this one loads its weights (after its worker has started).
    load = Backend.load_weights

    def partial_run_meanwhile(self: Backend) -> None:
        other = light()
        load(other)  # (Backend's own load_weights: this one is being patched)
        _interrupted_after_two_batches(monkeypatch, other, rows, tmp_path / "meanwhile", workers=0)
        load(self)

    monkeypatch.setattr(Backend, "load_weights", partial_run_meanwhile)
    arrays, meta, failures = _run_contents(extract(light(), rows, tmp_path / "meanwhile", batch_size=2, shard_size=2,
                                                   progress=False).path)
    assert meta == want[1] and all(np.array_equal(arrays[k], want[0][k]) for k in want[0])
    assert started == [1, 1] and forks == [1, 1, 1]  # the early worker, then one for the rows left
    monkeypatch.setattr(Backend, "load_weights", load)

    # Every row's prompt fits the context, but not with the 2 tokens to generate: refused in every batch.
    short = tmp_path / "short"
    shutil.copytree(ckpt, short)
    config = json.loads((short / "config.json").read_text())
    same = [dict(r, question="what is it?") for r in rows]
    length = int(Backend(ckpt, device="cpu", load_model=False).collate([Image.open(same[0]["image"]).convert("RGB")],
                                                                     ["what is it?"])["attention_mask"].sum())
    config["text_config"]["max_position_embeddings"] = length + 1
    (short / "config.json").write_text(json.dumps(config))
    run = extract(Backend(short, device="cpu", load_model=False), same, tmp_path / "long", batch_size=2,
                  max_new_tokens=2, on_error="skip", progress=False)
    assert started == [1, 1, 1] and run.ids == [] and len(run.failures) == 9
    assert {f["error"].split(": ", 1)[1] for f in run.failures} == {
        f"the prompt is {length} tokens long + 2 to generate, more than the model's maximum of {length + 1} "
        "(shorten the question)"}


def test_worker_errors_surface_in_the_main_process(tiny_ckpt, tmp_path, caplog):
    """A batch that fails in a worker is prepared again here (so a real error is raised with its own exception, and
    a passing one does no harm); a worker that dies
    (killed, out of memory) stops the run with a clear message instead of a hang."""
    from lvlmlp.data import read_manifest
    from lvlmlp.errors import LvlmlpError
    from lvlmlp.extraction.backend import Backend
    from lvlmlp.extraction.extract import extract

    parent = os.getpid()

    class FailsOnOneQuestion(Backend):
        def collate(self, images, questions):
            if "colour of this" in " ".join(questions):  # rows r4, r5, r10 and r11
                raise ValueError("processor failed on r4/r5")
            return super().collate(images, questions)

    class FailsInWorkers(Backend):
        def collate(self, images, questions):
            if os.getpid() != parent:
                raise RuntimeError("only in a worker")
            return super().collate(images, questions)

    class DiesInWorkers(Backend):
        def collate(self, images, questions):
            if os.getpid() != parent:
                os._exit(3)
            return super().collate(images, questions)

    rows = read_manifest(make_manifest(tmp_path, 16))  # enough batches that workers surely take some
    ckpt = tiny_ckpt("llava")
    with caplog.at_level("WARNING", logger="lvlmlp"):
        run = extract(FailsInWorkers(ckpt, device="cpu", dtype="float32"), rows, tmp_path / "c", batch_size=1,
                      progress=False, workers=2)  # every batch a worker failed on was prepared again here
    assert run.ids == [f"r{i}" for i in range(16)] and not run.failures
    warned = [r.getMessage() for r in caplog.records if "data-loader process failed" in r.getMessage()]
    assert len(warned) == 1 and "RuntimeError: only in a worker" in warned[0]  # said once, with the cause
    # the processor's error names its row (and --on-error skip would skip just that row)
    with pytest.raises(LvlmlpError, match="row 'r4': the processor rejects it .processor failed on r4/r5"):
        extract(FailsOnOneQuestion(ckpt, device="cpu", dtype="float32"), rows, tmp_path / "a", batch_size=1,
                progress=False, workers=2)
    with pytest.raises(LvlmlpError, match=r"a data-loader process died \(exit code 3\).*--workers 0"):
        extract(DiesInWorkers(ckpt, device="cpu", dtype="float32"), rows, tmp_path / "b", batch_size=1,
                progress=False, workers=1)
    run = extract(DiesInWorkers(ckpt, device="cpu", dtype="float32"), rows, tmp_path / "b", batch_size=1,
                  progress=False, workers=0)  # the advised re-run resumes and finishes
    assert run.ids == [f"r{i}" for i in range(16)]


def test_model_threads_leave_cores_to_the_workers_on_cpu(tiny_ckpt, tmp_path):
    """With torch's default of a thread per core, the model and the data-loader workers would fight for the same
    cores; extraction gives the model the cores the workers leave (at least one; all of them with --workers 0),
    never more than the caller set, and restores the setting."""
    from lvlmlp.data import read_manifest
    from lvlmlp.extraction.backend import Backend
    from lvlmlp.extraction.extract import extract

    seen: list[int] = []

    class RecordsThreads(Backend):
        def prefill(self, batch, **kwargs):
            seen.append(torch.get_num_threads())
            return super().prefill(batch, **kwargs)

    rows = read_manifest(make_manifest(tmp_path, 4))
    backend = RecordsThreads(tiny_ckpt("llava"), device="cpu", dtype="float32")
    from lvlmlp.extraction.loader import usable_cores

    cpus = usable_cores()  # this machine's (tested against cgroup files below)
    torch.set_num_threads(3)
    try:
        extract(backend, rows, tmp_path / "w1", batch_size=2, progress=False, workers=1)
        assert seen == [max(1, min(3, cpus - 1))] * 2 and torch.get_num_threads() == 3
        seen.clear()
        extract(backend, rows, tmp_path / "w0", batch_size=2, progress=False, workers=0)
        assert seen == [min(3, cpus)] * 2 and torch.get_num_threads() == 3  # inline: every core is the model's
        seen.clear()
        torch.set_num_threads(cpus + 5)  # more threads than cores (a CPU quota torch's default ignores)
        extract(backend, rows, tmp_path / "w0b", batch_size=2, progress=False, workers=0)
        assert seen == [cpus] * 2 and torch.get_num_threads() == cpus + 5
        seen.clear()
        torch.set_num_threads(1)  # the caller's lower setting stands
        extract(backend, rows, tmp_path / "w0c", batch_size=2, progress=False, workers=0)
        assert seen == [1, 1]
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("files, cap", [
    ({}, None),  # no cgroup files: the affinity alone
    ({"cpu.max": "max 100000\n"}, None),  # cgroup v2, no quota
    ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: two threads may run, each part of the time
    ({"cpu.max": "100000 100000\n"}, 1),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # cgroup v1, no quota
    ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # half a CPU: still one
    ({"cpu.max": "garbage\n"}, None),
    ({"cpu.max": "100000 0\n"}, None),
])
def test_usable_cores_are_the_affinity_capped_by_the_cgroup_quota(tmp_path, files, cap):
    from lvlmlp.extraction.loader import usable_cores

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(tmp_path) == (affinity if cap is None else min(affinity, cap))


def test_hub_id_from_the_local_cache_records_its_revision(tiny_ckpt, tmp_path, monkeypatch):
    """A hub id (offline, from the Hugging Face cache) loads through the Auto classes and the run records the
    snapshot's commit as the model revision. (The cache folder is huggingface_hub's HF_HUB_CACHE, which it and
    transformers read at each lookup: set here in this process rather than in a fresh one through the environment.)"""
    import shutil

    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llava"
    shutil.copytree(tiny_ckpt("llava"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    manifest = make_manifest(tmp_path, 2)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert constants.HF_HUB_OFFLINE  # tests/conftest.py: never the network
    assert main(["extract", "--model", "tiny-org/tiny-llava", "--data", str(manifest), "--out", str(tmp_path / "run"),
                 "--device", "cpu", "--no-progress"]) == 0
    info = open_run(tmp_path / "run").manifest
    assert (info["model"], info["model_revision"], info["weights_hash"]) == ("tiny-org/tiny-llava", commit, commit)


# ------------------------------------------------------------------------------------------------------------
# Mutation guards, from tests/test_guards_extract.py (marked `mutation_guard`):
# Guards of the extractor, in-process on a tiny LLaVA: --shard parsing and row blocks, the option checks, what a
# run's manifest records, recognising a finished run without its weights, last-token logits and store dtypes, the
# start line and progress bar, defaults, the context check and a row lost before the store. Each test names the
# breakage it catches (written against the survivors of `make mutation MODULES=extract`).

@pytest.mark.mutation_guard
def test_parse_shard_accepts_exactly_0_le_i_lt_n():
    """Catches: an off-by-one bound (I == N, N == 0, I < 0 accepted, or I == 0 / N == 1 refused), a lenient split."""
    assert parse_shard(None) is None
    for spec, want in (("0/1", (0, 1)), ("0/4", (0, 4)), ("3/4", (3, 4)), (" 1 / 2 ", (1, 2))):
        assert parse_shard(spec) == want
    for spec in ("4/4", "5/4", "-1/4", "0/0", "1/0", "0/-1"):
        with pytest.raises(LvlmlpError) as err:
            parse_shard(spec)
        assert str(err.value) == f"--shard: need 0 <= I < N, got {spec!r}"
    for spec in ("1of2", "1/2/3", "1", "", "a/b", "1.0/2"):
        with pytest.raises(LvlmlpError) as err:
            parse_shard(spec)
        assert str(err.value) == f"--shard: expected I/N such as 0/4, got {spec!r}"


@pytest.mark.mutation_guard
def test_shard_rows_are_contiguous_blocks_that_remember_their_input_position():
    """Catches: blocks that overlap, skip or reorder rows, a wrong boundary rounding, rows not numbered by their
    input position, or the caller's rows modified."""
    rows = [{"id": f"r{i}"} for i in range(10)]
    every = shard_rows(rows)
    assert every == [{"id": f"r{i}", "_row_index": i} for i in range(10)]
    assert rows == [{"id": f"r{i}"} for i in range(10)]  # the caller's dicts are left alone
    # Boundaries len * i // n: 0, 2, 5, 7, 10 for 10 rows in 4 shards (an independent count, not the formula's code).
    blocks = [shard_rows(rows, (i, 4)) for i in range(4)]
    assert [[r["_row_index"] for r in b] for b in blocks] == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]
    assert [r for b in blocks for r in b] == every
    assert shard_rows(rows, (0, 1)) == every
    assert [len(shard_rows(rows[:3], (i, 5))) for i in range(5)] == [0, 1, 0, 1, 1]


@pytest.mark.mutation_guard
def test_extract_options_refuse_each_bad_option_with_its_message():
    """Catches: a check dropped or inverted, or a message naming the wrong option or choices (by its field, or by
    the caller's name for it: the CLI's flag)."""
    ok = dict(store_dtype="float16", on_error="fail", batch_size=1, max_new_tokens=0)
    ExtractOptions(**ok).check_labels(False, "s")
    ExtractOptions(**{**ok, "store_dtype": "float32", "on_error": "skip", "max_new_tokens": 1}).check_labels(True, "s")
    with pytest.raises(LvlmlpError) as err:
        ExtractOptions(**ok).check_labels(True, "s")
    assert str(err.value) == "s: labels come from the model's answers here; give max_new_tokens K (> 0)"
    assert err.value.named(flag_names()) == "s: labels come from the model's answers here; give --max-new-tokens K (> 0)"
    cases = (
        ({"store_dtype": "int8"}, "{store_dtype}: expected one of ['float16', 'float32'], got 'int8'"),
        ({"on_error": "retry"}, "{on_error}: expected fail or skip, got 'retry'"),
        ({"batch_size": 0}, "{batch_size} must be >= 1 and {max_new_tokens} >= 0"),
        ({"max_new_tokens": -1}, "{batch_size} must be >= 1 and {max_new_tokens} >= 0"),
        ({"shard": (2, 2)}, "{shard}: need 0 <= I < N, got '2/2'"),
    )
    for change, message in cases:
        with pytest.raises(LvlmlpError) as err:
            ExtractOptions(**{**ok, **change})
        fields = ("store_dtype", "on_error", "batch_size", "max_new_tokens", "shard")
        assert str(err.value) == message.format(**{f: f for f in fields})
        assert err.value.named(flag_names()) == message.format(**{f: "--" + f.replace("_", "-") for f in fields})


@pytest.mark.mutation_guard
def test_run_settings_record_every_extraction_option_under_its_name():
    """Catches: a manifest key renamed or dropped, the rows' hash taken with their positions, or the stored-token
    count (1 for prefill, else min(max_new_tokens, logits_tokens)) computed wrongly."""
    rows = [{"id": "a", "image": "a.png", "question": "q?"}, {"id": "b", "image": "b.png", "question": "r?", "label": 1}]
    numbered = shard_rows(rows)
    model = {"model": "m", "vocab_size": 7}
    base = dict(batch_size=4, max_new_tokens=0, logits_tokens=None, hidden=False, layers=(), store_dtype="float16",
                shard=None, labels_from_responses=False)
    assert run_settings(model, numbered, **base) == {
        "model": "m", "vocab_size": 7, "dtype": "float16", "max_new_tokens": 0, "logits_tokens": 1, "hidden": False,
        "layers": [], "data_hash": rows_fingerprint(rows), "images_hash": images_fingerprint(rows), "n_input_rows": 2,
        "shard": None, "batch_size": 4,
        "labels_from_responses": False, "selection": None,
    }
    full = run_settings(model, numbered, **{**base, "max_new_tokens": 5, "hidden": True, "layers": (np.int64(3), -1),
                                            "shard": (1, 4), "labels_from_responses": True},
                        selection={"split": "test"})
    assert (full["max_new_tokens"], full["logits_tokens"], full["hidden"], full["layers"]) == (5, 5, True, [3, -1])
    assert type(full["layers"][0]) is int and full["shard"] == "1/4" and full["selection"] == {"split": "test"}
    assert full["labels_from_responses"] is True
    kept = [run_settings(model, numbered, **{**base, "max_new_tokens": 5, "logits_tokens": k})["logits_tokens"]
            for k in (1, 2, 5, 9)]
    assert kept == [1, 2, 5, 5]


@pytest.fixture(scope="module")
def tiny(tiny_ckpt, tmp_path_factory) -> tuple[Path, list[dict]]:
    ckpt = tiny_ckpt("llava")
    root = tmp_path_factory.mktemp("rows")
    rng = np.random.default_rng(3)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append({"id": f"r{i}", "image": str(root / f"{i}.png"), "question": f"what is {i}?"})
    return ckpt, rows


@pytest.mark.mutation_guard
def test_backend_settings_record_the_models_identity(tiny):
    """Catches: a manifest key renamed or dropped, or a value taken from the wrong attribute."""
    ckpt, _ = tiny
    backend = Backend(ckpt, device="cpu", dtype="float32", prompt_template="Q: {question}")
    assert backend_settings(backend) == {
        "model": str(ckpt), "model_revision": backend.revision, "weights_hash": backend.weights_hash,
        "family": "llava", "compute_dtype": "float32", "vocab_size": backend.vocab_size,
        "prompt_template": backend.prompt("{question}"), "device": "cpu",
    }
    assert backend.vocab_size > 0 and len(backend.weights_hash) >= 16
    assert "Q: {question}" in backend_settings(backend)["prompt_template"]


@pytest.mark.mutation_guard
def test_finished_run_is_recognised_without_weights_and_only_with_the_same_settings_and_rows(tiny, tmp_path):
    """Catches: a finished run not recognised by a weight-less backend (vocab size compared), or a run recognised
    after its settings, its shard or its rows changed."""
    ckpt, rows = tiny
    settings = dict(batch_size=2, max_new_tokens=0, logits_tokens=None, hidden=False, layers=(), store_dtype="float32",
                    shard=(1, 2), labels_from_responses=False)
    shard = shard_rows(rows, (1, 2))  # rows r2, r3 with _row_index 2, 3
    made = extract(Backend(ckpt, device="cpu"), shard, tmp_path / "run", progress=False, workers=0,
                   **{k: v for k, v in settings.items() if k != "labels_from_responses"})
    light = Backend(ckpt, device="cpu", load_model=False)
    found = finished_run(light, shard, tmp_path / "run", **settings)
    assert found is not None and found.path == made.path and found.ids == ["r2", "r3"]
    assert finished_run(light, shard_rows(rows, (0, 2)), tmp_path / "run", **settings) is None
    assert finished_run(light, shard, tmp_path / "run", **{**settings, "batch_size": 4}) is not None  # how, not what
    assert finished_run(light, shard, tmp_path / "run", **{**settings, "store_dtype": "float16"}) is None
    assert finished_run(light, shard, tmp_path / "run", **{**settings, "labels_from_responses": True}) is None
    changed = [dict(shard[0], question="another?"), shard[1]]
    assert finished_run(light, changed, tmp_path / "run", **settings) is None
    assert finished_run(light, shard, tmp_path / "elsewhere", **settings) is None


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory) -> dict:
    """Runs of the tiny LLaVA on 4 rows, through weights whose end-of-sequence tokens are row 0's first and row 1's
    second generated token (so rows stop after 1, 2 or 3 tokens): all 3 tokens kept (float32, hidden and layers),
    only the first (float16: + each row's last token), and a prefill (hidden and layers)."""
    import shutil

    ckpt, rows = tiny
    root = tmp_path_factory.mktemp("runs")
    backend = Backend(ckpt, device="cpu")
    batch = backend.encode([Image.open(r["image"]).convert("RGB") for r in rows], [r["question"] for r in rows])
    seq = backend.generate(batch, max_new_tokens=3)["sequences"].tolist()
    eos = [seq[0][0], seq[1][1]]
    stop = root / "stop_ckpt"
    shutil.copytree(ckpt, stop)
    gen = json.loads((stop / "generation_config.json").read_text())
    (stop / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": eos}))
    stopping = Backend(stop, device="cpu")
    common = dict(batch_size=4, workers=0, progress=False)  # the reference generate's batch (same shapes)
    return {
        "expected_n": [next((t + 1 for t, tok in enumerate(row) if tok in eos), 3) for row in seq],
        "all": extract(stopping, rows, root / "all", max_new_tokens=3, store_dtype="float32", hidden=True,
                       layers=(0, -1), **common),
        "first": extract(stopping, rows, root / "first", max_new_tokens=3, logits_tokens=1, store_dtype="float16",
                         **common),
        "prefill": extract(stopping, rows, root / "prefill", store_dtype="float32", hidden=True, layers=(0, -1),
                           **common),
    }


@pytest.mark.mutation_guard
def test_last_token_logits_dtypes_and_generation_hidden_states(runs):
    """Catches: each row's last-token logits taken at another position (or stored when every token is kept
    anyway), stored logits not in the store dtype, n_tokens / row_index in other dtypes, and hidden states or
    layers dropped or asked wrongly on the generation path (they are the prefill's: the first generated position)."""
    full, first, prefill = runs["all"], runs["first"], runs["prefill"]
    n = full.n_tokens
    assert n.tolist() == runs["expected_n"] and {1, 2, 3} <= set(n.tolist())  # rows stop after 1, 2 or 3 tokens
    assert first.has_last_logits and not full.has_last_logits and not prefill.has_last_logits
    want = np.stack([full.logits(int(k) - 1)[i] for i, k in enumerate(n)])
    np.testing.assert_allclose(first.last_logits().astype(np.float32), want, rtol=1e-2, atol=1e-2)  # float16
    np.testing.assert_allclose(first.logits(0).astype(np.float32), full.logits(0), rtol=1e-2, atol=1e-2)
    assert (first.logits(0).dtype, full.logits(0).dtype, first.last_logits().dtype) == (
        np.float16, np.float32, np.float16)
    for run in (full, first, prefill):
        assert run.n_tokens.dtype == np.int32 and run.row_index.dtype == np.int64
        assert run.row_index.tolist() == [0, 1, 2, 3]
    assert prefill.n_tokens.tolist() == [1, 1, 1, 1]
    np.testing.assert_allclose(full.hidden(), prefill.hidden(), atol=1e-4)
    for layer in (0, -1):
        np.testing.assert_allclose(full.layer(layer), prefill.layer(layer), atol=1e-4)


@pytest.mark.mutation_guard
def test_extract_logs_its_plan_shows_its_bar_and_names_skipped_rows(tiny, tmp_path, capsys, caplog):
    """Catches: the start line's fields (model, family, dtype, folder, rows, rows to do, batch, generation) or the
    skipped-rows warning changed or dropped, a bar without its name, unit or total, a bar shown with
    progress=False or hidden by default, and rows counted by batches."""
    ckpt, rows = tiny
    backend = Backend(ckpt, device="cpu", dtype="float32")
    bad = [*rows[:3], dict(rows[3], image=str(tmp_path / "missing.png"))]
    with caplog.at_level("INFO", logger="lvlmlp"):
        extract(backend, bad, tmp_path / "a", batch_size=2, workers=0, on_error="skip", max_new_tokens=2)
    bar = capsys.readouterr().err
    assert "extract: 100%" in bar and "| 4/4 [" in bar and "row/s]" in bar, bar
    with caplog.at_level("INFO", logger="lvlmlp"):
        extract(backend, rows[:3], tmp_path / "b", batch_size=3, workers=0, progress=False)
    assert capsys.readouterr().err == ""
    lines = [r.getMessage() for r in caplog.records if r.name == "lvlmlp"]
    assert f"extract: {ckpt} (llava, float32) -> {tmp_path / 'a'}: 4 rows, 4 to do, batch 2, generate 2 tokens" in lines
    assert f"extract: 1 row(s) skipped, see {tmp_path / 'a' / 'failures.jsonl'}" in lines
    assert f"extract: {ckpt} (llava, float32) -> {tmp_path / 'b'}: 3 rows, 3 to do, batch 3, prefill only" in lines


@pytest.mark.mutation_guard
def test_extract_defaults_manifest_and_messages(tiny, tmp_path):
    """Catches: other defaults (hidden, shard size, the rows' name in messages), an option not reaching the run's
    manifest (batch size, kept tokens, hidden, store dtype, shard, selection), a shard's rows renumbered from 0,
    the label rule checked or applied without the model's answer, and on_error not reaching the row checks (which
refuse a missing image before any folder is written)."""
    ckpt, rows = tiny
    backend = Backend(ckpt, device="cpu")
    run = extract(backend, rows[:2], tmp_path / "d", workers=0, progress=False)
    assert not (tmp_path / "d" / "hidden.npy").exists() and run.manifest["shard_size"] == 256
    with pytest.raises(LvlmlpError, match=r"^rows: no rows to extract$"):
        extract(backend, [], tmp_path / "e", progress=False)
    with pytest.raises(LvlmlpError, match=r"^src: labels come from the model's answers here"):
        extract(backend, rows, tmp_path / "f", label_fn=lambda response, row: 1, source="src", progress=False)
    with pytest.raises(LvlmlpError, match=r"^src: row 'r1': image not found"):
        extract(backend, [rows[0], dict(rows[1], image="nope.png")], tmp_path / "g", source="src", progress=False)
    assert not (tmp_path / "g").exists()  # refused by the row check, before any folder is written
    skipped = extract(backend, [rows[0], dict(rows[1], image="nope.png")], tmp_path / "h", on_error="skip",
                      progress=False, workers=0)
    assert skipped.ids == ["r0"] and [f["id"] for f in skipped.failures] == ["r1"]

    shard = shard_rows(rows, (1, 2))
    label = lambda response, row: len(response) % 2 + 2 * int(row["id"] == "r3")  # noqa: E731
    run = extract(backend, shard, tmp_path / "s", batch_size=3, max_new_tokens=3, logits_tokens=2, hidden=True,
                  store_dtype="float32", shard=(1, 2), selection={"split": "test"}, label_fn=label, workers=0,
                  progress=False)
    m = run.manifest
    assert (m["batch_size"], m["max_new_tokens"], m["logits_tokens"], m["hidden"], m["dtype"], m["shard"],
            m["selection"], m["labels_from_responses"]) == (3, 3, 2, True, "float32", "1/2", {"split": "test"}, True)
    assert run.row_index.tolist() == [2, 3]
    assert [mm["label"] for mm in run.meta] == [label(mm["response"], mm) for mm in run.meta]


@pytest.mark.mutation_guard
def test_rows_too_long_for_prompt_plus_new_tokens_are_refused(tiny, tmp_path, monkeypatch):
    """Catches: the context check made without the tokens to generate (a row whose prompt fits but whose answer
    would run past the model's positions)."""
    ckpt, rows = tiny
    backend = Backend(ckpt, device="cpu")
    batch = backend.encode([Image.open(rows[0]["image"]).convert("RGB")], [rows[0]["question"]])
    length = int(batch["attention_mask"].sum())
    monkeypatch.setattr(backend.model.config.get_text_config(), "max_position_embeddings", length + 1)
    run = extract(backend, rows[:1], tmp_path / "r", max_new_tokens=2, on_error="skip", workers=0, progress=False)
    assert run.ids == [] and run.failures[0]["error"] == (
        f"row 'r0': the prompt is {length} tokens long + 2 to generate, more than the model's maximum of "
        f"{length + 1} (shorten the question)")


@pytest.mark.mutation_guard
def test_a_row_lost_between_the_model_and_the_store_fails_the_run(tiny, tmp_path, monkeypatch):
    """Catches: the run closed without checking that every input row was committed exactly once (a row lost by a
    bug between the model and the store would otherwise leave a complete-looking run one row short)."""
    import lvlmlp.extraction.extract as extract_module

    ckpt, rows = tiny
    run_batch = extract_module.run_batch

    def drop_last(*args, **kwargs):
        meta, arrays = run_batch(*args, **kwargs)
        return meta[:-1], {name: a[:-1] for name, a in arrays.items()}

    monkeypatch.setattr(extract_module, "run_batch", drop_last)
    with pytest.raises(LvlmlpError, match=r"missing"):
        extract(Backend(ckpt, device="cpu"), rows[:2], tmp_path / "lost", workers=0, progress=False)
    manifest = tmp_path / "lost" / "manifest.json"
    assert not manifest.is_file() or not json.loads(manifest.read_text()).get("complete")


def test_resuming_after_a_crash_refuses_committed_rows_whose_images_were_replaced(tiny, tmp_path, monkeypatch):
    """extract gives the store its rows' image stamps: a run stopped after its first shard, whose extracted rows'
    images are then replaced in place, is not resumed with their old features (the shard is named)."""
    import shutil

    import lvlmlp.extraction.extract as extract_module

    ckpt, rows = tiny
    rows = [dict(r, image=str(shutil.copy(r["image"], tmp_path / Path(r["image"]).name))) for r in rows]
    run_batch, calls = extract_module.run_batch, []

    def crash_on_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("crash")
        return run_batch(*args, **kwargs)

    monkeypatch.setattr(extract_module, "run_batch", crash_on_the_second_batch)
    backend = Backend(ckpt, device="cpu")
    with pytest.raises(RuntimeError, match="crash"):
        extract(backend, rows, tmp_path / "run", workers=0, progress=False, batch_size=2, shard_size=2)
    monkeypatch.setattr(extract_module, "run_batch", run_batch)
    Image.new("RGB", (30, 30), (1, 2, 3)).save(rows[0]["image"])  # r0 was extracted into shard 0
    with pytest.raises(LvlmlpError, match=r"000000\.safetensors: the image of row 'r0' changed since this shard"):
        extract(backend, rows, tmp_path / "run", workers=0, progress=False, batch_size=2, shard_size=2)


@pytest.mark.mutation_guard
def test_finished_run_reads_options_given_as_such_quartiles_and_the_selection(tiny, tmp_path):
    """Catches: finished_run ignoring an `ExtractOptions` passed positionally, leaving `layers: quartiles`
    unresolved (or resolving it for no backend), not comparing the selection, or taking labels from the responses
    by default; resolve_layers not asking the backend, and a backend without `resolve_layers` (docs/backends.md)
    given a named layer set without a one-line refusal or its indices not read as integers."""
    from lvlmlp.extraction.extract import resolve_layers

    ckpt, rows = tiny
    light = Backend(ckpt, device="cpu", load_model=False)
    assert resolve_layers(light, "quartiles") == [0, 1, 2]  # the tiny LLaVA's 2 decoder layers
    with pytest.raises(LvlmlpError, match=r"^--layers quartiles: this backend does not say its layer count; give "
                                          r"the indices$"):
        resolve_layers(object(), "quartiles")
    assert resolve_layers(object(), (np.int64(1), 2)) == [1, 2]
    options = ExtractOptions(batch_size=2, layers="quartiles", store_dtype="float32")
    chosen = {"split": "test", "limit": 4}
    made = extract(Backend(ckpt, device="cpu"), rows, tmp_path / "run", options, progress=False, workers=0,
                   selection=chosen)
    assert made.manifest["layers"] == [0, 1, 2] and made.manifest["selection"] == chosen
    found = finished_run(light, rows, tmp_path / "run", options, selection=chosen)
    assert found is not None and found.path == made.path
    assert finished_run(light, rows, tmp_path / "run", options) is None  # another selection (none)
    assert finished_run(light, rows, tmp_path / "run", options, selection=chosen, labels_from_responses=True) is None
    assert finished_run(light, rows, tmp_path / "run", ExtractOptions(batch_size=2, layers=(0, 1, 2),
                                                                      store_dtype="float32"), selection=chosen)


@pytest.mark.mutation_guard
def test_vision_features_and_marks_reach_the_run_and_each_image_is_stamped_once(tiny, tmp_path, monkeypatch):
    """Catches: `vision` not asked of the backend (prefill or generate), stored under another name or not at all,
    its manifest mark missing or false; a trusted checkpoint's code not recorded as `trust_remote_code: true`; and
    the run's images hash stat'ing the images a second time instead of using the stamps of its shards."""
    import lvlmlp.data
    import lvlmlp.extraction.extract as ex

    ckpt, rows = tiny
    backend = Backend(ckpt, device="cpu", dtype="float32")
    batch = backend.encode([load_image(r["image"]) for r in rows], [r["question"] for r in rows])
    expected = backend.prefill(batch, vision=True)["vision"].numpy()
    stats: list[str] = []
    stamp = lvlmlp.data.image_stamp

    def counted(row):
        stats.append(row["id"])
        return stamp(row)

    monkeypatch.setattr(lvlmlp.data, "image_stamp", counted)
    monkeypatch.setattr(ex, "image_stamp", counted)
    for new_tokens in (0, 2):
        stats.clear()
        run = extract(backend, rows, tmp_path / f"v{new_tokens}", batch_size=4, max_new_tokens=new_tokens,
                      vision=True, store_dtype="float32", progress=False, workers=0)
        assert stats == ["r0", "r1", "r2", "r3"]  # once each, for the manifest and the shards alike
        assert run.manifest["vision"] is True and sorted(p.name for p in run.path.glob("vision.npy")) == ["vision.npy"]
        np.testing.assert_allclose(run.vision(), expected, rtol=0, atol=1e-5)
    trusted = Backend(ckpt, device="cpu", load_model=False, trust_remote_code=True)
    assert backend_settings(trusted)["trust_remote_code"] is True
    assert "trust_remote_code" not in backend_settings(backend)


@pytest.mark.mutation_guard
def test_a_protocol_backend_is_asked_for_no_vision_and_records_no_remote_code(tmp_path):
    """Catches: `vision=` passed to a `--backend` class whose prefill/generate do not take it (docs/backends.md), a
    backend without a `trust_remote_code` attribute recorded as trusting remote code (or failing), and run_settings
    taking labels from the responses by default."""
    import importlib.util

    from lvlmlp.data import read_manifest
    from lvlmlp.testing import tiny_manifest

    example = Path(__file__).resolve().parents[2] / "examples" / "minigpt4_backend.py"  # docs/backends.md's example
    spec = importlib.util.spec_from_file_location("minigpt4_backend_for_extract", example)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ckpt = module.write_tiny(tmp_path / "ckpt")
    backend = module.MiniGPT4Backend(str(ckpt), device=torch.device("cpu"), dtype=torch.float32)
    assert not hasattr(backend, "trust_remote_code")
    rows = read_manifest(tiny_manifest(tmp_path / "data", n_train=2, n_test=1))
    for new_tokens in (0, 2):
        run = extract(backend, rows, tmp_path / f"run{new_tokens}", max_new_tokens=new_tokens, progress=False,
                      workers=0)
        assert len(run) == 3 and "trust_remote_code" not in run.manifest and "vision" not in run.manifest

    class Remote:  # a backend answering from elsewhere: no torch module, `model` None (only guided decoding needs it)
        def __init__(self, inner: object) -> None:
            self.inner, self.model = inner, None

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

    for workers in (0, 1):  # nothing of it is loaded by extract (a Backend without weights would be)
        assert len(extract(Remote(backend), rows, tmp_path / f"remote{workers}", workers=workers, progress=False)) == 3
    assert run_settings({"model": "m"}, rows)["labels_from_responses"] is False


def test_the_manifest_names_a_protocol_backend_and_remote_code_with_its_auto_class_and_nothing_else(
        minigpt4, tiny_ckpt, tmp_path):
    """`backend_settings`: a `--backend` class is recorded as it was named, a checkpoint's own code with the Auto
    class it was loaded through; a plain transformers checkpoint's manifest has neither key."""
    from lvlmlp.extraction.protocol import load_backend
    from lvlmlp.testing import tiny_remote_checkpoint

    _, ckpt, _ = minigpt4
    spec = f"{Path(__file__).resolve().parents[2] / 'examples' / 'minigpt4_backend.py'}:MiniGPT4Backend"
    keys = ("backend", "trust_remote_code", "auto_class")
    got = backend_settings(load_backend(spec, str(ckpt), device="cpu", dtype="float32"))
    assert {k: got.get(k) for k in keys} == {"backend": spec, "trust_remote_code": None, "auto_class": None}
    base = tiny_ckpt("llava")
    remote = tiny_remote_checkpoint(base, tmp_path, "tiny_remote_settings", "tiny_remote_settings",
                               "AutoModelForImageTextToText")
    got = backend_settings(Backend(remote, device="cpu", trust_remote_code=True))
    assert {k: got.get(k, "absent") for k in keys} == {
        "backend": "absent", "trust_remote_code": True, "auto_class": "AutoModelForImageTextToText"}
    assert not set(keys) & set(backend_settings(Backend(base, device="cpu")))


def test_selected_and_sharded_rows_stay_validated_and_are_not_checked_again(tmp_path, monkeypatch):
    """A manifest is validated whole when read (`ValidRows`); its shards and the extraction's numbered rows are not
    validated again, while rows from elsewhere (a Python caller's dicts) are, errors naming their source."""
    import lvlmlp.extraction.extract as extract_module
    from lvlmlp.data import ValidRows, read_manifest
    from lvlmlp.extraction.extract import checked_rows
    from lvlmlp.testing import tiny_manifest

    rows = read_manifest(tiny_manifest(tmp_path / "data", n_train=4, n_test=2))
    shard = shard_rows(rows, (1, 2))
    assert isinstance(rows, ValidRows) and isinstance(shard, ValidRows) and isinstance(shard_rows(rows), ValidRows)
    assert [r["_row_index"] for r in shard] == [3, 4, 5]
    checked: list[int] = []  # the sizes of the row lists really validated (not already ValidRows)
    validate = extract_module.validate_rows
    monkeypatch.setattr(extract_module, "validate_rows", lambda rows, source: (
        checked.append(len(rows)) if not isinstance(rows, ValidRows) else None, validate(rows, source))[1])
    assert [r["_row_index"] for r in checked_rows(shard, "m.jsonl", "fail")] == [3, 4, 5]
    assert checked == []
    checked_rows([{k: v for k, v in r.items() if k != "_row_index"} for r in rows], "m.jsonl", "fail")
    assert checked == [6]
    with pytest.raises(LvlmlpError, match=r"^mine\.jsonl: row 'a': missing or empty 'question'$"):
        checked_rows([{"id": "a", "image": str(rows[0]["image"])}], "mine.jsonl", "fail")
