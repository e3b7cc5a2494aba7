"""One output rule for every command that writes (lvlmlp.outputs, docs/run-folders.md): never over an input, never
over the user's files, atomic, a re-run into its own folder replaces it, a bad --out is one line."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lvlmlp.cli import main
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.store import RunWriter
from lvlmlp.outputs import MARKER, replaced_file, replaced_folder


def run_cli(capsys: pytest.CaptureFixture, argv: list) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("lvlmlp: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0].removeprefix("lvlmlp: error: ")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def manifest(root: Path, n: int = 4, question: str = "what is shown") -> Path:
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        lines.append({"id": f"r{i}", "image": f"img/{i}.png", "question": f"{question} {i}?", "label": i % 2})
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def write_run(folder: Path, n: int = 20, v: int = 6) -> Path:
    """A complete run folder written by the library (no model needed to probe it)."""
    rng = np.random.default_rng(0)
    settings = {"model": "m", "dtype": "float32", "vocab_size": v, "max_new_tokens": 0, "data_hash": "h",
                "n_input_rows": n}
    w = RunWriter(folder, settings, shard_size=8)
    labels = np.arange(n) % 2
    logits = rng.normal(size=(n, 1, v)).astype(np.float32)
    logits[:, 0, 0] += labels  # a learnable signal
    w.append([{"id": f"r{i}", "question": "q", "label": int(labels[i])} for i in range(n)],
             {"logits": logits, "n_tokens": np.ones(n, dtype=np.int32), "row_index": np.arange(n, dtype=np.int64)})
    return w.close().path


def user_folder(path: Path, *names: str) -> dict[str, bytes]:
    path.mkdir(parents=True, exist_ok=True)
    for name in names:
        (path / name).write_text(f"the user's own {name}")
    return snapshot(path)


# ------------------------------------------------------------------------------------- outputs that are inputs
def test_finetune_out_containing_its_model_is_refused_and_the_model_kept(tiny_ckpt, tmp_path, capsys):
    """Catches: `finetune --model work/model --out work` deleting the base checkpoint (issue 33)."""
    work = tmp_path / "work"
    shutil.copytree(tiny_ckpt("llava"), work / "model")
    before = snapshot(work)
    data = manifest(tmp_path / "d")
    code, _, err = run_cli(capsys, ["finetune", "--model", work / "model", "--data", data, "--out", work,
                                    "--answers", "Yes,No", "--epochs", "1", "--no-progress"])
    assert one_line_error(code, err) == (f"--out {work}: contains --model {work / 'model'} (an input of this command, "
                                         "which writing --out would overwrite); give another --out")
    assert snapshot(work) == before


def test_generate_out_that_is_its_manifest_or_a_link_to_it_is_refused(tmp_path, capsys):
    """Catches: `generate --data m.jsonl --out m.jsonl` overwriting the manifest (before any model is loaded)."""
    data = manifest(tmp_path)
    before = data.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(data)
    for out in (data, tmp_path / "link.jsonl"):
        code, _, err = run_cli(capsys, ["generate", "--model", tmp_path / "no-model", "--probe", tmp_path / "p",
                                        "--data", data, "--out", out])
        assert one_line_error(code, err) == (f"--out {out}: is --data {data} (an input of this command, which "
                                             "writing --out would overwrite); give another --out")
    assert data.read_bytes() == before


def test_tasks_dump_over_its_own_manifest_is_refused(tmp_path, capsys):
    data = manifest(tmp_path)
    before = data.read_bytes()
    code, _, err = run_cli(capsys, ["tasks", "jsonl", "--data-root", data, "--dump", data])
    assert one_line_error(code, err).startswith(f"--dump {data}: is --data-root {data} (an input")
    assert data.read_bytes() == before


def test_report_into_its_own_evaluation_folder_and_probe_eval_into_its_run_are_refused(tmp_path, capsys):
    """Catches: `report e --out e` replacing the evaluation's metrics.json with the report's."""
    run = write_run(tmp_path / "run")
    assert run_cli(capsys, ["probe", "train", "--run", run, "--out", tmp_path / "p"])[0] == 0
    assert run_cli(capsys, ["probe", "eval", "--probe", tmp_path / "p", "--run", run, "--out", tmp_path / "e",
                            "--n-boot", "20"])[0] == 0
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, ["report", tmp_path / "e", "--out", tmp_path / "e"])
    assert one_line_error(code, err).startswith(f"--out {tmp_path / 'e'}: is EVAL_DIRS {tmp_path / 'e'} (an input")
    code, _, err = run_cli(capsys, ["probe", "eval", "--probe", tmp_path / "p", "--run", run,
                                    "--out", run / "eval"])
    assert one_line_error(code, err).startswith(f"--out {run / 'eval'}: lies inside --run {run} (an input")
    code, _, err = run_cli(capsys, ["probe", "train", "--run", run, "--out", tmp_path])
    assert one_line_error(code, err).startswith(f"--out {tmp_path}: contains --run {run} (an input")
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------- the user's folders
@pytest.mark.parametrize("argv, names, kind", [
    (["tiny-data", "--out", "{out}"], ("manifest.jsonl", "notes.txt"), "an lvlmlp tiny-data folder"),
    (["tiny-model", "--family", "llava", "--out", "{out}"], ("config.json", "model.safetensors"),
     "an lvlmlp tiny-model folder"),
    (["demo", "--out", "{out}"], ("results.json", "report.html"), "an lvlmlp demo folder"),
    (["finetune", "--model", "m", "--data", "{data}", "--out", "{out}"], ("train_log.jsonl", "mine.txt"),
     "an lvlmlp finetune folder"),
    (["probe", "eval", "--probe", "{probe}", "--run", "{run}", "--out", "{out}"], ("metrics.json",),
     "a probe eval folder (lvlmlp probe eval)"),
    (["probe", "train", "--run", "{run}", "--out", "{out}"], ("probe.json",), "a probe folder (lvlmlp probe train)"),
    (["report", "{eval}", "--out", "{out}"], ("report.md",), "a report folder (lvlmlp report)"),
])
def test_a_folder_holding_the_users_files_is_refused_untouched(tmp_path, capsys, argv, names, kind):
    """Catches: tiny-data, tiny-model, demo, finetune, probe eval, probe train and report writing over the user's
    files of the same names (issue 27 item 2, issue 33)."""
    run = write_run(tmp_path / "run")
    assert run_cli(capsys, ["probe", "train", "--run", run, "--out", tmp_path / "p"])[0] == 0
    assert run_cli(capsys, ["probe", "eval", "--probe", tmp_path / "p", "--run", run, "--out", tmp_path / "e",
                            "--n-boot", "20"])[0] == 0
    out = tmp_path / "users"
    before = user_folder(out, *names)
    fill = {"out": out, "data": manifest(tmp_path / "d"), "probe": tmp_path / "p", "run": run, "eval": tmp_path / "e"}
    code, _, err = run_cli(capsys, [a.format(**fill) for a in argv])
    listed = ", ".join(sorted(names))
    assert one_line_error(code, err) == (f"--out {out}: exists and is not {kind} (it holds {listed}); "
                                         "give an empty or new folder")
    assert snapshot(out) == before


def test_lvlmlp_run_refuses_a_users_folder_and_an_out_inside_its_data(tmp_path, capsys):
    config = Path(__file__).resolve().parents[1] / "configs" / "ci_tiny.yaml"
    before = user_folder(tmp_path / "mine", "results.json")
    code, _, err = run_cli(capsys, ["run", config, "--out", tmp_path / "mine", "--model", tmp_path / "m",
                                    "--set", f"data_root={tmp_path / 'd'}"])
    assert one_line_error(code, err) == (f"out {tmp_path / 'mine'}: exists and is not an `lvlmlp run` folder (it "
                                         "holds results.json); give an empty or new folder")
    assert snapshot(tmp_path / "mine") == before
    (tmp_path / "d").mkdir()
    code, _, err = run_cli(capsys, ["run", config, "--out", tmp_path / "d" / "out", "--model", tmp_path / "m",
                                    "--set", f"data_root={tmp_path / 'd'}"])
    assert one_line_error(code, err).startswith(f"out {tmp_path / 'd' / 'out'}: lies inside data_root")


# ------------------------------------------------------------------------------------- re-runs and atomicity
def test_re_runs_into_their_own_folders_replace_them(tmp_path, capsys):
    """Catches: a re-run of probe train / probe eval / report / tiny-data into its own folder being a
    FileExistsError traceback, or leaving files of the first run behind."""
    run = write_run(tmp_path / "run")
    steps = [["probe", "train", "--run", run, "--out", tmp_path / "p"],
             ["probe", "eval", "--probe", tmp_path / "p", "--run", run, "--out", tmp_path / "e", "--n-boot", "20"],
             ["report", tmp_path / "e", "--out", tmp_path / "rep"],
             ["tiny-data", "--out", tmp_path / "td", "--n-train", "4", "--n-test", "2"]]
    for argv in steps:
        assert run_cli(capsys, argv)[0] == 0
    first = {name: snapshot(tmp_path / name) for name in ("p", "e", "rep", "td")}
    (tmp_path / "rep" / "stale.png").write_bytes(b"left by an older report")
    for argv in steps:
        code, _, err = run_cli(capsys, argv)
        assert code == 0, err
    again = {name: snapshot(tmp_path / name) for name in ("p", "e", "rep", "td")}
    assert "stale.png" not in again["rep"]  # replaced whole, not overwritten file by file
    assert again["p"] == first["p"] and again["e"] == first["e"] and again["td"] == first["td"]
    assert json.loads(again["p"][MARKER])["kind"] == "probe"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_a_failed_probe_write_leaves_the_old_probe_whole(tmp_path, capsys, monkeypatch):
    """Catches: a failed write of probe.json leaving the new weights beside the old JSON (issue 27 item 4)."""
    run = write_run(tmp_path / "run")
    assert run_cli(capsys, ["probe", "train", "--run", run, "--out", tmp_path / "p"])[0] == 0
    before = snapshot(tmp_path / "p")
    real = Path.write_text

    def full_disk(self: Path, text: str, *a, **k):
        if self.name == "probe.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, text, *a, **k)

    monkeypatch.setattr(Path, "write_text", full_disk)
    code, _, err = run_cli(capsys, ["probe", "train", "--run", run, "--out", tmp_path / "p", "--C", "0.01"])
    assert one_line_error(code, err).startswith(f"--out {tmp_path / 'p'}: cannot write (No space left on device")
    assert snapshot(tmp_path / "p") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p", "run"]


def test_replaced_file_and_folder_keep_the_old_output_when_the_block_fails(tmp_path):
    out = tmp_path / "results.jsonl"
    out.write_text('{"id": "old"}\n')
    with pytest.raises(RuntimeError), replaced_file(out) as tmp:
        tmp.write_text('{"id": "new"}\n')
        raise RuntimeError("the second batch failed")
    assert out.read_text() == '{"id": "old"}\n' and sorted(os.listdir(tmp_path)) == ["results.jsonl"]
    with replaced_folder(tmp_path / "r", "report") as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), replaced_folder(tmp_path / "r", "report") as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("killed")
    assert (tmp_path / "r" / "a").read_text() == "1"
    with pytest.raises(LvlmlpError, match=re.escape(f"--out {tmp_path / 'r'}: exists and is not a probe folder")):
        with replaced_folder(tmp_path / "r", "probe"):
            pass


# ------------------------------------------------------------------------------------- bad --out paths
def test_a_file_where_a_folder_belongs_and_the_reverse_are_one_line_errors(tmp_path, capsys):
    """Catches: NotADirectoryError / IsADirectoryError tracebacks of demo, tiny-model, tiny-data, generate, tasks."""
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    data = manifest(tmp_path / "d")
    for argv in (["demo", "--out", a_file], ["tiny-model", "--family", "llava", "--out", a_file],
                 ["tiny-data", "--out", a_file], ["extract", "--model", "m", "--data", data, "--out", a_file],
                 ["probe", "train", "--run", tmp_path / "d", "--out", a_file]):
        code, _, err = run_cli(capsys, argv)
        assert one_line_error(code, err) == f"--out {a_file}: exists and is not a folder"
    (tmp_path / "a-folder").mkdir()
    for argv, flag in ((["generate", "--model", "m", "--probe", "p", "--data", data, "--out", tmp_path / "a-folder"],
                        "--out"),
                       (["tasks", "jsonl", "--data-root", data, "--dump", tmp_path / "a-folder"], "--dump")):
        code, _, err = run_cli(capsys, argv)
        assert one_line_error(code, err) == f"{flag} {argv[argv.index(flag) + 1]}: is a folder; give a file name"
    code, _, err = run_cli(capsys, ["tiny-data", "--out", a_file / "sub"])
    assert one_line_error(code, err) == (f"--out {a_file / 'sub'}: {a_file} is a file, not a folder, so nothing can "
                                         "be written under it")
    assert a_file.read_text() == "mine"


def test_a_read_only_out_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    """Catches: PermissionError tracebacks. As root (where permissions do not stop writes), the refusal of the
    file system is simulated where it would come: creating the temporary folder."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:
        real = Path.mkdir

        def refuse(self: Path, *a, **k):
            if self.parent == ro:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real(self, *a, **k)

        monkeypatch.setattr(Path, "mkdir", refuse)
    code, _, err = run_cli(capsys, ["tiny-data", "--out", ro / "data"])
    line = one_line_error(code, err)
    assert line.startswith(f"--out {ro / 'data'}: ") and "ermission denied" in line, line
    ro.chmod(0o755)
    assert list(ro.iterdir()) == []


def test_extract_refuses_its_out_before_any_weight_file_is_read(tiny_ckpt, tmp_path, capsys):
    """Catches: extract loading (here: failing to read) the model's weights before refusing --out (issue 25)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_ckpt("llava"), model)
    for weights in model.glob("*.safetensors"):
        weights.write_bytes(b"garbage, not safetensors")
        weights.chmod(0)
    data = manifest(tmp_path / "d")
    before = user_folder(tmp_path / "mine", "meta.jsonl")
    code, _, err = run_cli(capsys, ["extract", "--model", model, "--data", data, "--out", tmp_path / "mine",
                                    "--device", "cpu", "--no-progress"])
    assert one_line_error(code, err) == (f"--out {tmp_path / 'mine'}: exists and is not an lvlmlp run folder (it "
                                         "holds meta.jsonl); give an empty or new folder")
    assert snapshot(tmp_path / "mine") == before
    code, _, err = run_cli(capsys, ["extract", "--model", model, "--data", data, "--out", model / "run",
                                    "--device", "cpu", "--no-progress"])
    assert one_line_error(code, err).startswith(f"--out {model / 'run'}: lies inside --model {model}")


def test_what_a_killed_swap_left_is_put_back_or_removed_by_the_next_writer(tmp_path):
    """Catches: a writer killed between the two renames of a swap leaving the old output under a hidden name (and
    its temporary build) for good. pid 99999999 is above Linux's pid limit: never a live process."""
    with replaced_folder(tmp_path / "r", "report") as tmp:
        (tmp / "a").write_text("1")
    (tmp_path / "r").rename(tmp_path / ".r.99999999-abcdef01.old")
    (tmp_path / ".r.99999999-deadbeef.tmp").mkdir()
    with pytest.raises(RuntimeError), replaced_folder(tmp_path / "r", "report"):
        raise RuntimeError("this writer fails too")
    assert (tmp_path / "r" / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_an_lvlmlp_run_folder_from_before_the_marker_is_still_resumed(tmp_path):
    """Catches: upgrading lvlmlp making every existing experiment folder 'not an lvlmlp run folder'; while a folder
    that merely holds a 'report' folder of the user's stays refused."""
    from lvlmlp.outputs import claim_folder

    old = tmp_path / "exp"
    for name in ("steps", "runs", "report"):
        (old / name).mkdir(parents=True)
    assert claim_folder(old, "experiment", "out") == old and json.loads((old / MARKER).read_text())["kind"] == \
        "experiment"
    (tmp_path / "mine" / "report").mkdir(parents=True)
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(LvlmlpError, match=re.escape(f"out {tmp_path / 'mine'}: exists and is not an `lvlmlp run` "
                                                    "folder (it holds notes.txt, report)")):
        claim_folder(tmp_path / "mine", "experiment", "out")


def test_an_out_that_is_a_link_to_a_folder_replaces_the_folder_and_keeps_the_link(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    assert run_cli(capsys, ["probe", "train", "--run", run, "--out", tmp_path / "real"])[0] == 0
    (tmp_path / "link").symlink_to(tmp_path / "real")
    code, _, err = run_cli(capsys, ["probe", "train", "--run", run, "--out", tmp_path / "link", "--C", "0.5"])
    assert code == 0, err
    assert (tmp_path / "link").is_symlink()
    assert json.loads((tmp_path / "real" / "probe.json").read_text())["params"]["C"] == 0.5
