"""Faults and bad input through `lvlmlp.cli.main`: every case stops with exit code 2 and ONE line naming the row,
file or key (no traceback, no memory address), and leaves the user's files and the committed rows intact; the
data-loss cases also check that the same command then completes correctly."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from lvlmlp.cli import main
from lvlmlp.extraction.legacy import import_legacy
from lvlmlp.extraction.store import RunWriter, open_run
from lvlmlp.probing.features import FeatureSpec
from lvlmlp.probing.probes import LogisticProbe

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "ci_tiny.yaml"


# ------------------------------------------------------------------------------------------------ helpers
def run_cli(capsys: pytest.CaptureFixture, argv: list[str]) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, needles: tuple[str, ...]) -> str:
    lines = [line for line in err.splitlines() if line.startswith("lvlmlp: error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not re.search(r"0x[0-9a-fA-F]{6,}", lines[0]), lines[0]  # no memory addresses
    return lines[0]


def make_manifest(root: Path, n: int = 4, size: int = 16, questions: dict[int, str] | None = None) -> Path:
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        q = (questions or {}).get(i, f"what is shown {i}?")
        lines.append({"id": f"r{i}", "image": f"img/{i}.png", "question": q, "label": i % 2})
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def extract_argv(ckpt: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", "--model", ckpt, "--data", data, "--out", out, "--device", "cpu", "--dtype", "float32",
            "--store-dtype", "float32", "--workers", "0", "--no-progress", *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def partial_run(tmp: Path, ckpt: Path, capsys: pytest.CaptureFixture) -> tuple[Path, Path, list[str]]:
    """An extraction of 6 rows stopped by a corrupt image at r5: shards 000000 (r0, r1) and 000001 (r2, r3) are
    committed. Returns (run folder, manifest, the command that resumes it once the image is fixed)."""
    data = make_manifest(tmp, 6)
    good = (tmp / "img" / "5.png").read_bytes()
    (tmp / "img" / "5.png").write_bytes(b"not a png")
    out = tmp / "run"
    argv = extract_argv(ckpt, data, out, "--batch-size", "2", "--shard-size", "2")
    code, err = run_cli(capsys, argv)
    assert code == 2 and "row 'r5'" in err
    assert sorted(p.name for p in (out / "shards").glob("*.safetensors")) == ["000000.safetensors",
                                                                               "000001.safetensors"]
    (tmp / "img" / "5.png").write_bytes(good)
    return out, data, argv


def write_run(folder: Path, n: int = 4, v: int = 6, shard: str | None = None, ids: list[int] | None = None) -> Path:
    """A complete run folder written by the library (no model), rows `ids` of an input of n rows."""
    ids = list(range(n)) if ids is None else ids
    rng = np.random.default_rng(len(ids))
    settings = {"model": "m", "dtype": "float32", "vocab_size": v, "max_new_tokens": 0, "shard": shard,
                "data_hash": "h" + str(shard), "n_input_rows": n}
    w = RunWriter(folder, settings, shard_size=2)
    w.append([{"id": f"r{i}", "question": "q", "label": i % 2} for i in ids],
             {"logits": rng.normal(size=(len(ids), 1, v)).astype(np.float32),
              "n_tokens": np.ones(len(ids), dtype=np.int32), "row_index": np.array(ids, dtype=np.int64)})
    return w.close().path


def write_probe(folder: Path, dim: int, model: str = "m") -> Path:
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(20, dim)), np.arange(20) % 2
    probe = LogisticProbe().fit(X, y, spec=FeatureSpec(kind="logits", token=0, dim=dim, model=model))
    return probe.save(folder)


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding `folder`'s lock, as a running `lvlmlp extract` would."""
    code = ("import sys, time; from lvlmlp.locking import FolderLock; lock = FolderLock(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(60)")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def legacy_lines(path: Path, n: int = 4, bad: dict[int, Any] | None = None, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for i in range(n):
            logits = (bad or {}).get(i, rng.normal(size=5).round(3).tolist())
            f.write(json.dumps({"question_id": i, "question": "q", "label": i % 2, "logits": logits},
                               allow_nan=True) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ the table
@dataclass
class Case:
    """`setup(tmp, ctx)` writes the inputs and returns the argv; after the error, `check(tmp, ctx)` asserts that
    nothing was lost (and, for faults, that the same command then completes)."""

    setup: Callable[[Path, dict], list[str]]
    needles: tuple[str, ...]
    check: Callable[[Path, dict], None] | None = None
    model: bool = False  # needs the tiny checkpoint
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    extra: dict = field(default_factory=dict)


def _foreign_out(tmp: Path, ctx: dict) -> list[str]:
    out = tmp / "mine"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "notes.safetensors").write_bytes(b"precious")
    (out / "meta.jsonl").write_text('{"my": "data"}\n')
    np.save(out / "logits.npy", np.arange(3.0))
    ctx["before"] = snapshot(out)
    return extract_argv(ctx["ckpt"], make_manifest(tmp), out)


def _foreign_manifest(tmp: Path, ctx: dict) -> list[str]:
    out = tmp / "mine"
    out.mkdir()
    (out / "manifest.json").write_text('{"experiment": "mine"}')
    ctx["before"] = snapshot(out)
    return extract_argv(ctx["ckpt"], make_manifest(tmp), out)


def _intact(tmp: Path, ctx: dict) -> None:
    assert snapshot(tmp / "mine") == ctx["before"]


def _flip_shard_bytes(tmp: Path, ctx: dict) -> list[str]:
    out, _, argv = partial_run(tmp, ctx["ckpt"], ctx["capsys"])
    path = out / "shards" / "000001.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-8:] = bytes(b ^ 0x5A for b in raw[-8:])  # inside the last tensor's data: the header still parses
    path.write_bytes(bytes(raw))
    ctx["before"] = snapshot(out / "shards")
    return argv


def _truncate_shard(tmp: Path, ctx: dict) -> list[str]:
    out, _, argv = partial_run(tmp, ctx["ckpt"], ctx["capsys"])
    path = out / "shards" / "000000.safetensors"
    path.write_bytes(path.read_bytes()[:6])
    ctx["before"] = snapshot(out / "shards")
    return argv


def _shards_intact(tmp: Path, ctx: dict) -> None:
    assert snapshot(tmp / "run" / "shards") == ctx["before"]
    assert not (tmp / "run" / "meta.jsonl").exists()  # never marked complete


def _locked(command: str) -> Callable[[Path, dict], list[str]]:
    def setup(tmp: Path, ctx: dict) -> list[str]:
        out = tmp / "out"
        ctx["holder"] = hold_lock(out)
        if command == "extract":
            return extract_argv(ctx["ckpt"], make_manifest(tmp), out)
        if command == "merge":
            return ["merge", write_run(tmp / "s0", shard="0/1"), "--out", out]
        if command == "import-legacy":
            return ["import-legacy", legacy_lines(tmp / "legacy.jsonl"), "--out", out]
        return ["run", CONFIG, "--model", ctx["ckpt"], "--set", f"data_root={make_manifest(tmp)}", "--out", out]

    return setup


def _lock_released(tmp: Path, ctx: dict) -> None:
    proc = ctx.pop("holder")
    assert f"pid {proc.pid}" in ctx["message"]
    proc.kill()
    proc.wait()
    assert not (tmp / "out" / "manifest.json").exists() and not list((tmp / "out").glob("*.tmp"))


def _legacy_source_changed(tmp: Path, ctx: dict) -> list[str]:
    src = legacy_lines(tmp / "legacy.jsonl", n=6, bad={5: ["x"] * 5})
    with pytest.raises(Exception, match="legacy.jsonl:6"):
        import_legacy(src, tmp / "run", shard_size=2)  # rows 0-3 committed, then the bad line stops it
    ctx["before"] = snapshot(tmp / "run" / "shards")
    legacy_lines(src, n=6, seed=1)  # the file is replaced by another one
    return ["import-legacy", src, "--out", tmp / "run"]


def _merge_missing(tmp: Path, ctx: dict) -> list[str]:
    return ["merge", write_run(tmp / "s0", 6, shard="0/3", ids=[0, 1]),
            write_run(tmp / "s2", 6, shard="2/3", ids=[4, 5]), "--out", tmp / "merged"]


def _no_space(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("lvlmlp.extraction.store.os.posix_fallocate", full)


def _full_disk(tmp: Path, ctx: dict) -> list[str]:
    ctx["src"] = legacy_lines(tmp / "legacy.jsonl", n=5)
    return ["import-legacy", ctx["src"], "--out", tmp / "run"]


def _full_disk_then_rerun(tmp: Path, ctx: dict) -> None:
    assert not list((tmp / "run").glob("*.npy*")) and list((tmp / "run" / "shards").glob("*.safetensors"))
    ctx["monkeypatch"].undo()
    assert main(["import-legacy", str(ctx["src"]), "--out", str(tmp / "run")]) == 0
    run = open_run(tmp / "run")
    assert run.ids == [str(i) for i in range(5)]
    expected = [json.loads(line)["logits"] for line in ctx["src"].read_text().splitlines()]
    np.testing.assert_allclose(run.logits(0), expected, rtol=1e-6)


def _bad_manifest(content: bytes) -> Callable[[Path, dict], list[str]]:
    def setup(tmp: Path, ctx: dict) -> list[str]:
        data = tmp / "data.jsonl"
        data.write_bytes(content)
        return extract_argv(ctx["ckpt"], data, tmp / "out")

    return setup


def _long_question(tmp: Path, ctx: dict) -> list[str]:
    data = make_manifest(tmp, 3, questions={1: " ".join(["word"] * 3000)})
    return extract_argv(ctx["ckpt"], data, tmp / "out")


def _long_with_generation(tmp: Path, ctx: dict) -> list[str]:
    """A prompt that fits the context alone but not with the tokens to generate."""
    from lvlmlp.extraction.backend import Backend

    question = " ".join(["word"] * 150)
    data = make_manifest(tmp, 2, questions={1: question})
    backend = Backend(ctx["ckpt"], device="cpu", dtype="float32")
    n = int(backend.collate([Image.new("RGB", (16, 16))], [question])["attention_mask"].sum())
    assert n < 512
    return extract_argv(ctx["ckpt"], data, tmp / "out", "--max-new-tokens", str(512 - n + 1))


def _image_problem(kind: str) -> Callable[[Path, dict], list[str]]:
    def setup(tmp: Path, ctx: dict) -> list[str]:
        data = make_manifest(tmp, 3)
        img = tmp / "img" / "1.png"
        img.unlink()
        if kind == "loop":
            (tmp / "img" / "loop.png").symlink_to(img)
            img.symlink_to(tmp / "img" / "loop.png")
        elif kind == "garbage":
            img.write_bytes(b"\x00garbage\x01" * 10)
        elif kind == "bomb":
            Image.new("RGB", (64, 64)).save(img)  # 4096 px, over twice the limit patched in below
        return extract_argv(ctx["ckpt"], data, tmp / "out")

    return setup


def _small_pixel_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)


def _corrupt_weights(tmp: Path, ctx: dict) -> list[str]:
    import shutil

    ckpt = tmp / "ckpt"
    shutil.copytree(ctx["ckpt"], ckpt)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return extract_argv(ckpt, make_manifest(tmp), tmp / "out")


def _uncached_hub_id(tmp: Path, ctx: dict) -> list[str]:
    return extract_argv("nobody-here/not-a-cached-model", make_manifest(tmp), tmp / "out")


def _hub_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")  # nothing listens there


def _damaged_run(damage: str) -> Callable[[Path, dict], list[str]]:
    def setup(tmp: Path, ctx: dict) -> list[str]:
        run = write_run(tmp / "run")
        if damage == "truncated-logits":
            path = run / "logits.npy"
            path.write_bytes(path.read_bytes()[:-30])
        elif damage == "short-logits":
            np.save(run / "logits.npy", np.load(run / "logits.npy")[:, :3])
        elif damage == "missing-meta":
            lines = (run / "meta.jsonl").read_text().splitlines(True)
            (run / "meta.jsonl").write_text("".join(lines[:-1]))
        elif damage == "extra-meta":
            with (run / "meta.jsonl").open("a") as f:
                f.write(json.dumps({"id": "r9", "question": "q"}) + "\n")
        elif damage == "manifest-list":
            (run / "manifest.json").write_text("[1, 2]")
        return ["probe", "train", "--run", run, "--out", tmp / "probe"]

    return setup


def _damaged_probe(damage: str) -> Callable[[Path, dict], list[str]]:
    def setup(tmp: Path, ctx: dict) -> list[str]:
        run = write_run(tmp / "run", v=6)
        probe = write_probe(tmp / "probe", dim=6)
        weights = probe / "probe.safetensors"
        if damage == "truncated":
            weights.write_bytes(weights.read_bytes()[:20])
        elif damage == "unknown-param":
            edit_json(probe / "probe.json", lambda d: d["params"].update(alpha=1))
        elif damage == "no-params":
            edit_json(probe / "probe.json", lambda d: d.pop("params"))
        elif damage == "classes-3":
            edit_json(probe / "probe.json", lambda d: d.update(classes=[0, 1, 2]))
        elif damage == "classes-5-7":
            edit_json(probe / "probe.json", lambda d: d.update(classes=[5, 7]))
        elif damage == "nan":
            arrays = load_file(str(weights))
            arrays["coef"][0, 2] = np.nan
            save_file(arrays, str(weights))
        elif damage == "no-coef":
            arrays = load_file(str(weights))
            del arrays["coef"]
            save_file(arrays, str(weights))
        return ["probe", "eval", "--probe", probe, "--run", run, "--out", tmp / "eval", "--n-boot", "5"]

    return setup


def _other_model_probe(tmp: Path, ctx: dict) -> list[str]:
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(ctx["ckpt"]).get_text_config().vocab_size
    probe = write_probe(tmp / "probe", dim=vocab, model="someone/another-model")
    ctx["generate"] = ["generate", "--model", ctx["ckpt"], "--data", make_manifest(tmp, 2), "--probe", probe,
                       "--template", "Sorry,", "--out", tmp / "gen.jsonl", "--max-new-tokens", "6", "--device", "cpu",
                       "--dtype", "float32", "--no-progress"]
    return ctx["generate"]


def _other_model_allowed(tmp: Path, ctx: dict) -> None:
    assert not (tmp / "gen.jsonl").exists()
    assert main([str(a) for a in [*ctx["generate"], "--allow-other-model"]]) == 0
    assert [json.loads(line)["id"] for line in (tmp / "gen.jsonl").read_text().splitlines()] == ["r0", "r1"]


def _config(override: str | None = None, text: str | None = None) -> Callable[[Path, dict], list[str]]:
    def setup(tmp: Path, ctx: dict) -> list[str]:
        config = CONFIG
        if text is not None:
            config = tmp / "exp.yaml"
            config.write_text(CONFIG.read_text() + text)
        argv = ["run", config, "--model", ctx["ckpt"], "--set", f"data_root={make_manifest(tmp)}",
                "--out", tmp / "exp"]
        return [*argv, "--set", override] if override else argv

    return setup


def _nothing_extracted(tmp: Path, ctx: dict) -> None:
    assert not (tmp / "exp").exists()  # refused before any work


def _legacy_bad(value: Any) -> Callable[[Path, dict], list[str]]:
    def setup(tmp: Path, ctx: dict) -> list[str]:
        return ["import-legacy", legacy_lines(tmp / "legacy.jsonl", bad={2: [0.5, value, 1, 2, 3]}), "--out",
                tmp / "run"]

    return setup


CASES: dict[str, Case] = {
    # data loss and silent corruption
    "out-is-a-foreign-folder": Case(_foreign_out, ("not an lvlmlp run folder", "mine"), _intact, model=True),
    "out-has-a-foreign-manifest": Case(_foreign_manifest, ("not an lvlmlp run folder",), _intact, model=True),
    "shard-bytes-corrupted": Case(_flip_shard_bytes, ("000001.safetensors", "checksum", "delete this file"),
                                  _shards_intact, model=True),
    "shard-header-broken": Case(_truncate_shard, ("000000.safetensors", "corrupt shard", "delete this file"),
                                _shards_intact, model=True),
    "extract-locked": Case(_locked("extract"), ("in use by pid",), _lock_released, model=True),
    "merge-locked": Case(_locked("merge"), ("in use by pid",), _lock_released),
    "import-legacy-locked": Case(_locked("import-legacy"), ("in use by pid",), _lock_released),
    "run-locked": Case(_locked("run"), ("in use by pid",), _lock_released, model=True),
    "import-legacy-source-changed": Case(_legacy_source_changed, ("source_sha256",),
                                         lambda tmp, ctx: _same(tmp / "run" / "shards", ctx)),
    "merge-shard-missing": Case(_merge_missing, ("shard 1/3 is missing",),
                                lambda tmp, ctx: _absent(tmp / "merged")),
    "disk-full-at-consolidation": Case(_full_disk, ("no space left on device",), _full_disk_then_rerun,
                                       patch=_no_space),
    # manifests
    "manifest-not-utf8": Case(_bad_manifest(b'{"id": "a", "image": "x.png", "question": "q"}\n{"id": "\xff"}\n'),
                              ("data.jsonl:2", "not UTF-8"), model=True),
    "manifest-empty": Case(_bad_manifest(b"\n"), ("data.jsonl", "no rows"), model=True),
    "question-too-long": Case(_long_question, ("row 'r1'", "maximum of 512"), model=True),
    "prompt-plus-generation-too-long": Case(_long_with_generation, ("row 'r1'", "to generate", "maximum of 512"),
                                            model=True),
    # images
    "image-symlink-loop": Case(_image_problem("loop"), ("row 'r1'", "symbolic link"), model=True),
    "image-garbage-no-address": Case(_image_problem("garbage"), ("row 'r1'", "1.png"), model=True),
    "image-decompression-bomb": Case(_image_problem("bomb"), ("row 'r1'", "decompression bomb"), model=True,
                                     patch=_small_pixel_limit),
    # model folders
    "model-weights-truncated": Case(_corrupt_weights, ("model.safetensors", "corrupt or truncated"), model=True),
    "hub-id-not-cached-offline": Case(_uncached_hub_id, ("nobody-here/not-a-cached-model", "not in the local",
                                                         "HF_HUB_OFFLINE")),
    "hub-id-not-cached-no-network": Case(_uncached_hub_id, ("not in the local", "127.0.0.1 is unreachable",
                                                            "HF_HUB_OFFLINE=1"), patch=_hub_unreachable),
    # run folders
    "run-logits-truncated": Case(_damaged_run("truncated-logits"), ("logits.npy",)),
    "run-logits-too-few-rows": Case(_damaged_run("short-logits"), ("logits.npy", "3 rows", "meta.jsonl has 4")),
    "run-meta-row-missing": Case(_damaged_run("missing-meta"), ("meta.jsonl", "3 rows", "manifest says 4")),
    "run-meta-row-extra": Case(_damaged_run("extra-meta"), ("meta.jsonl", "5 rows", "manifest says 4")),
    "run-manifest-not-object": Case(_damaged_run("manifest-list"), ("manifest.json", "JSON object")),
    # probes
    "probe-weights-truncated": Case(_damaged_probe("truncated"), ("probe.safetensors", "unreadable")),
    "probe-unknown-param": Case(_damaged_probe("unknown-param"), ("probe.json", "params.alpha")),
    "probe-params-missing": Case(_damaged_probe("no-params"), ("probe.json", "'params'")),
    "probe-three-classes-binary-weights": Case(_damaged_probe("classes-3"), ("probe.safetensors", "[0, 1, 2]")),
    "probe-classes-5-7": Case(_damaged_probe("classes-5-7"), ("probe.json", "[5, 7]")),
    "probe-nan-weights": Case(_damaged_probe("nan"), ("probe.safetensors", "coef", "NaN")),
    "probe-coef-missing": Case(_damaged_probe("no-coef"), ("probe.safetensors", "missing coef")),
    "generate-probe-of-other-model": Case(_other_model_probe, ("someone/another-model", "--allow-other-model"),
                                          _other_model_allowed, model=True),
    # configs of `lvlmlp run`
    "config-batch-size-string": Case(_config('batch_size="eight"'), ("batch_size", "integer", "'eight'"),
                                     _nothing_extracted, model=True),
    "config-layers-not-list": Case(_config("extract.layers=5"), ("extract.layers", "list"), _nothing_extracted,
                                   model=True),
    "config-hidden-no": Case(_config('extract.hidden="no"'), ("extract.hidden", "true or false"),
                             _nothing_extracted, model=True),
    "config-n-boot-negative": Case(_config("n_boot=-3"), ("n_boot", ">= 0"), _nothing_extracted, model=True),
    "config-store-dtype": Case(_config("extract.store_dtype=float8"), ("extract.store_dtype", "float8"),
                               _nothing_extracted, model=True),
    "config-probe-kind": Case(_config("probe.kind=svm"), ("probe.kind", "svm"), _nothing_extracted, model=True),
    "config-baseline": Case(_config("baselines=[max-prob, bogus]"), ("baselines[1]", "bogus"), _nothing_extracted,
                            model=True),
    "config-yaml-python-tag": Case(_config(text="extra: !!python/object/apply:os.system [echo hi]\n"),
                                   ("exp.yaml", "tags are not allowed", "line"), _nothing_extracted, model=True),
    "config-unknown-key": Case(_config("extract.hiden=true"), ("extract.'hiden'",), _nothing_extracted, model=True),
    # import-legacy logits
    "legacy-logit-string": Case(_legacy_bad("0.3"), ("legacy.jsonl:3", "'0.3'")),
    "legacy-logit-null": Case(_legacy_bad(None), ("legacy.jsonl:3", "None")),
    "legacy-logit-nan": Case(_legacy_bad(float("nan")), ("legacy.jsonl:3", "nan")),
    "legacy-logit-infinite": Case(_legacy_bad(float("inf")), ("legacy.jsonl:3", "inf")),
}


def _same(folder: Path, ctx: dict) -> None:
    assert snapshot(folder) == ctx["before"]


def _absent(folder: Path) -> None:
    assert not folder.exists()


@pytest.mark.parametrize("name", list(CASES))
def test_fault_gives_one_line_error_and_loses_nothing(name: str, tmp_path: Path, tiny_ckpt, capsys, monkeypatch):
    case = CASES[name]
    ctx: dict[str, Any] = {"capsys": capsys, "monkeypatch": monkeypatch}
    if case.model:
        ctx["ckpt"] = tiny_ckpt("llava")
    argv = case.setup(tmp_path, ctx)
    if case.patch:
        case.patch(monkeypatch)
    try:
        code, err = run_cli(capsys, argv)
        ctx["message"] = assert_one_line_error(code, err, case.needles)
        if case.check:
            case.check(tmp_path, ctx)
    finally:
        if "holder" in ctx:
            ctx["holder"].kill()
            ctx["holder"].wait()


# ------------------------------------------------------------------------------------------------ faults that recover
def test_removed_shard_is_redone_and_rows_come_out_once_in_order(tmp_path: Path, tiny_ckpt, capsys):
    """The obvious recovery from a bad shard (delete it, re-run) gives every row once, in order, with the values of
    an uninterrupted run (batch composition differs, hence a tolerance)."""
    ckpt = tiny_ckpt("llava")
    out, data, argv = partial_run(tmp_path, ckpt, capsys)
    (out / "shards" / "000000.safetensors").unlink()
    assert main([str(a) for a in argv]) == 0
    run = open_run(out)
    assert run.ids == [f"r{i}" for i in range(6)] and list(run.row_index) == list(range(6))
    assert main([str(a) for a in extract_argv(ckpt, data, tmp_path / "fresh")]) == 0
    np.testing.assert_allclose(run.logits(0), open_run(tmp_path / "fresh").logits(0), atol=1e-4, rtol=0)


def test_killed_merge_is_resumed_by_the_same_command(tmp_path: Path, capsys, monkeypatch):
    parts = [write_run(tmp_path / f"s{i}", 6, shard=f"{i}/2", ids=ids) for i, ids in enumerate([[0, 1, 2], [3, 4, 5]])]
    argv = ["merge", *map(str, parts), "--out", str(tmp_path / "merged")]
    calls = []
    original = RunWriter.append

    def dies_after_one_chunk(self: RunWriter, meta: list[dict], arrays: dict) -> None:
        if calls:
            raise KeyboardInterrupt  # Ctrl-C (or a kill) midway through the merge
        calls.append(1)
        original(self, meta, arrays)

    monkeypatch.setattr(RunWriter, "append", dies_after_one_chunk)
    monkeypatch.setattr("lvlmlp.extraction.store.merge_runs.__defaults__", (2,))  # chunks of 2 rows: several chunks
    assert main(argv) == 130
    assert (tmp_path / "merged" / "shards" / "000000.safetensors").exists()
    monkeypatch.undo()
    assert main(argv) == 0
    merged = open_run(tmp_path / "merged")
    assert merged.ids == [f"r{i}" for i in range(6)]
    expected = np.concatenate([open_run(p).logits(0) for p in parts])
    np.testing.assert_array_equal(merged.logits(0), expected)
    assert main(argv) == 0  # a finished merge re-run is a no-op, not "already exists"


def test_skip_mode_records_bad_rows_and_extracts_the_others(tmp_path: Path, tiny_ckpt, capsys):
    """--on-error skip: a too-long question, a looping symlink and an image the processor rejects (Qwen2-VL: aspect
    ratio above 200) are recorded in failures.jsonl with their row; every other row is extracted."""
    data = make_manifest(tmp_path, 5, questions={1: " ".join(["word"] * 3000)})
    img = tmp_path / "img"
    (img / "2.png").unlink()
    (img / "loop.png").symlink_to(img / "2.png")
    (img / "2.png").symlink_to(img / "loop.png")
    Image.new("RGB", (2000, 8)).save(img / "3.png")
    argv = extract_argv(tiny_ckpt("qwen2_vl"), data, tmp_path / "out", "--on-error", "skip", "--batch-size", "5")
    code, err = run_cli(capsys, argv)
    assert code == 0, err
    run = open_run(tmp_path / "out")
    assert run.ids == ["r0", "r4"]
    failures = {f["id"]: f["error"] for f in run.failures}
    assert set(failures) == {"r1", "r2", "r3"}
    assert "maximum of" in failures["r1"] and "symbolic link" in failures["r2"]
    assert "processor rejects" in failures["r3"] and "aspect ratio" in failures["r3"]


def test_decompression_bomb_warning_names_the_row(tmp_path: Path, monkeypatch, caplog):
    from lvlmlp.data import load_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (40, 40)).save(tmp_path / "big.png")  # 1600 px: over the limit, under twice it
    with caplog.at_level("WARNING", logger="lvlmlp"):
        load_image(tmp_path / "big.png", "row-7")
    assert any("row 'row-7'" in r.getMessage() and "big.png" in r.getMessage() for r in caplog.records)


def test_lock_names_its_holder_and_dies_with_it(tmp_path: Path):
    proc = hold_lock(tmp_path / "run")
    try:
        text = (tmp_path / "run" / ".lvlmlp.lock").read_text()
        assert f"pid {proc.pid}" in text
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 10
    while True:  # the kernel drops the lock with the process: no stale lock to clean
        try:
            write_run(tmp_path / "run")
            break
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.1)
    assert len(open_run(tmp_path / "run")) == 4
