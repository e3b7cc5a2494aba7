"""The README stays true: its commands run as written, and its demo table is what `lvlmlp demo` writes.

Every fenced code block of README.md is preceded by `<!-- readme-test: run -->` or `<!-- readme-test: skip (why) -->`.
The `run` blocks are run in order, as written, by one bash (with history expansion on, as in an interactive shell,
so an unquoted `!` fails) in a scratch folder laid out like the repository (`.venv`, `src/`, `configs/` linked)."""

from __future__ import annotations

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
# The demo's AUROCs and accuracies are seeded, but another CPU's float kernels may flip the order of near-tied scores;
# each flip moves an AUROC by 1/(n0 * n1) ~ 1e-4 here, so the third decimal may differ by one or two.
DEMO_TOLERANCE = 0.002


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


def same_summary(readme: str, written: str) -> list[str]:
    """Differences between two demo summaries: text and integers exactly, decimals within DEMO_TOLERANCE."""
    problems = []
    if NUMBER.split(readme) != NUMBER.split(written):
        problems.append("the text (or a count) differs")
    for a, b in zip(NUMBER.findall(readme), NUMBER.findall(written)):
        if abs(float(a) - float(b)) > DEMO_TOLERANCE:
            problems.append(f"{a} in the README, {b} written by the demo")
    return problems


def test_every_block_is_marked_and_the_runnable_ones_are_many() -> None:
    text = (ROOT / "README.md").read_text()
    blocks = readme_blocks()
    assert len(blocks) == text.count("\n```") // 2, "a fenced block without a readme-test marker"
    assert all(marker for marker, _, _ in blocks), [code[:60] for marker, _, code in blocks if not marker]
    runnable = script(blocks)
    assert "source .venv/bin/activate" in runnable and "'token-prob:!Unanswerable'" in runnable
    assert same_summary("a 0.500 [0.401, 0.6] (n=3)", "a 0.501 [0.400, 0.6] (n=3)") == []
    assert same_summary("a 0.500 (n=3)", "a 0.503 (n=3)") == ["0.500 in the README, 0.503 written by the demo"]
    assert same_summary("a 0.500 (n=3)", "a 0.500 (n=4)") == ["the text (or a count) differs"]


def test_ci_config_header_is_the_readme_block() -> None:
    header = [line[1:].strip() for line in (ROOT / "configs" / "ci_tiny.yaml").read_text().splitlines()
              if line.startswith("#   lvlmlp ")]
    ci_block = next(code for marker, _, code in readme_blocks() if "configs/ci_tiny.yaml" in code and marker == "run")
    assert header and header == ci_block.strip().splitlines()


@pytest.mark.readme  # ~2.5 minutes: `make test-readme` (and CI) run it, `make test` leaves it out
def test_readme_commands_run_as_written_and_its_demo_table_is_the_demos(tmp_path: Path) -> None:
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").is_file():
        pytest.skip("the tests do not run in a virtual environment (make test makes .venv)")
    for name, target in ((".venv", venv), ("src", ROOT / "src"), ("configs", ROOT / "configs")):
        (tmp_path / name).symlink_to(target)
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    (tmp_path / "readme.sh").write_text(script(readme_blocks()))
    proc = subprocess.run(["bash", "readme.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "event not found" not in proc.stderr
    # What the blocks promise: the demo's summary, a finished run recognised, the reports, the CI experiment.
    assert same_summary(demo_summary(), (tmp_path / "demo_out" / "summary.md").read_text()) == []
    assert "runs/tiny-5: finished already with these settings" in proc.stderr
    for path in ("runs/tiny/logits.npy", "evals/answerability/metrics.json", "report/report.html",
                 "out/guarded.jsonl", "ci_out/report/report.html"):
        assert (tmp_path / path).is_file(), path
