"""The README stays true: its commands run as written, and its demo table is what `lvlmlp demo` writes.

Every fenced code block of README.md is preceded by `<!-- readme-test: run -->` or `<!-- readme-test: skip (why) -->`.
The `run` blocks are run in order, as written, by one bash (with history expansion on, as in an interactive shell,
so an unquoted `!` fails) in a scratch folder laid out like the repository (`.venv`, `src/`, `configs/` linked)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lvlmlp

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(lvlmlp.__file__).resolve().parents[1]
BLOCK = re.compile(r"^(<!-- readme-test: (run|skip \([^\n]*\)) -->\n)?```(\w+)\n(.*?)^```$", re.M | re.S)
NUMBER = re.compile(r"\d+\.\d+")
CELL = re.compile(r"(\d+\.\d+)(?:\s*\(n=(\d+)\))?")  # a decimal and the row count a cell may give after it
# How far a demo number may move on another CPU, whose float kernels sum in another order: a near-tie of greedy
# decoding can change one row's answer (and so its later tokens, its own-answer score, its membership in a token's
# rows), and a near-tie of scores can swap two rows. One row moves an AUROC on n rows by up to 1/min(n0, n1), 2/n for
# balanced classes: a decimal resting on n rows may differ by 2/n (the cell's "(n=K)", else the demo's test rows),
# never less than 0.002. Text and integers (counts) must be equal.
DEMO_FLOOR = 0.002


def tolerance(n: int) -> float:
    return max(DEMO_FLOOR, 2 / n)


def readme_blocks() -> list[tuple[str, str, str]]:
    """(marker, language, code) of every fenced block of README.md, in order."""
    return [(m.group(2) or "", m.group(3), m.group(4)) for m in BLOCK.finditer((ROOT / "README.md").read_text())]


def script(blocks: list[tuple[str, str, str]]) -> str:
    parts = ["set -e -o pipefail", "set -o history -o histexpand  # as an interactive bash: an unquoted ! fails"]
    for marker, language, code in blocks:
        if marker != "run":
            continue
        if language == "python":
            parts.append(f"python - <<'README_PYTHON'\n{code}README_PYTHON")
        else:
            assert language == "bash", language
            parts.append(code)
    return "\n".join(parts) + "\n"


def demo_summary() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("<!-- demo summary: begin -->\n")[1].split("<!-- demo summary: end -->")[0]


def same_summary(readme: str, written: str, n_rows: int) -> list[str]:
    """Differences between two demo summaries: text and integers exactly, each decimal within `tolerance` of the
    rows it rests on (`n_rows` where the cell gives no count)."""
    problems = []
    if NUMBER.split(readme) != NUMBER.split(written):
        problems.append("the text (or a count) differs")
    for a, b in zip(CELL.finditer(readme), CELL.finditer(written)):
        n = int(a.group(2)) if a.group(2) else n_rows
        if abs(float(a.group(1)) - float(b.group(1))) > tolerance(n) + 1e-9:  # 1e-9: decimal text as floats
            problems.append(f"{a.group(1)} in the README, {b.group(1)} written by the demo (on {n} rows: "
                            f"tolerance {tolerance(n):.3f})")
    return problems


def test_every_block_is_marked_and_the_runnable_ones_are_many() -> None:
    text = (ROOT / "README.md").read_text()
    blocks = readme_blocks()
    assert len(blocks) == text.count("\n```") // 2, "a fenced block without a readme-test marker"
    assert all(marker for marker, _, _ in blocks), [code[:60] for marker, _, code in blocks if not marker]
    runnable = script(blocks)
    assert "source .venv/bin/activate" in runnable and "'token-prob:!Unanswerable'" in runnable
    assert same_summary("a 0.500 [0.401, 0.6]", "a 0.510 [0.391, 0.6]", 200) == []  # 2/200 = 0.01
    assert same_summary("a 0.500 [0.4]", "a 0.511 [0.4]", 200) == [
        "0.500 in the README, 0.511 written by the demo (on 200 rows: tolerance 0.010)"]
    assert same_summary("a 0.771 (n=16) / 0.875 (n=16)", "a 0.792 (n=16) / 0.875 (n=16)", 200) == []
    assert same_summary("a 0.771 (n=16)", "a 0.900 (n=16)", 200) == [
        "0.771 in the README, 0.900 written by the demo (on 16 rows: tolerance 0.125)"]
    assert same_summary("a 0.999", "a 0.997", 5000) == []  # never tighter than 0.002
    assert same_summary("a 0.500 (n=3)", "a 0.500 (n=4)", 200) == ["the text (or a count) differs"]
    assert same_summary("61/100 -> 3/100", "61/100 -> 4/100", 200) == ["the text (or a count) differs"]


def test_ci_config_header_is_the_readme_block() -> None:
    header = [line[1:].strip() for line in (ROOT / "configs" / "ci_tiny.yaml").read_text().splitlines()
              if line.startswith("#   lvlmlp ")]
    ci_block = next(code for marker, _, code in readme_blocks() if "configs/ci_tiny.yaml" in code and marker == "run")
    assert header and header == ci_block.strip().splitlines()


def scratch(tmp_path: Path) -> dict[str, str]:
    """A scratch folder laid out like the repository; the environment the README's commands run in."""
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").is_file():
        pytest.skip("the tests do not run in a virtual environment (make test makes .venv)")
    for name, target in ((".venv", venv), ("src", ROOT / "src"), ("configs", ROOT / "configs")):
        (tmp_path / name).symlink_to(target)
    return dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")


def demo_rows(summary_dir: Path) -> int:
    return json.loads((summary_dir / "results.json").read_text())["n_test"]


@pytest.mark.readme  # ~2.5 minutes: `make test-readme` (and CI) run it, `make test` leaves it out
def test_readme_commands_run_as_written_and_its_demo_table_is_the_demos(tmp_path: Path) -> None:
    env = scratch(tmp_path)  # the demo as written: one torch thread (its default)
    (tmp_path / "readme.sh").write_text(script(readme_blocks()))
    proc = subprocess.run(["bash", "readme.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "event not found" not in proc.stderr
    # What the blocks promise: the demo's summary, a finished run recognised, the reports, the CI experiment.
    out = tmp_path / "demo_out"
    assert same_summary(demo_summary(), (out / "summary.md").read_text(), demo_rows(out)) == []
    assert "runs/tiny-5: finished already with these settings" in proc.stderr
    for path in ("runs/tiny/logits.npy", "evals/answerability/metrics.json", "report/report.html",
                 "out/guarded.jsonl", "ci_out/report/report.html"):
        assert (tmp_path / path).is_file(), path


@pytest.mark.readme  # ~2 minutes: the demo alone on two torch threads, whose kernels sum in another order
def test_the_demo_table_holds_on_two_threads(tmp_path: Path) -> None:
    env = scratch(tmp_path)
    proc = subprocess.run([str(Path(sys.prefix) / "bin" / "lvlmlp"), "demo", "--out", "demo_out", "--threads", "2",
                           "--no-progress"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "demo_out"
    assert same_summary(demo_summary(), (out / "summary.md").read_text(), demo_rows(out)) == []
