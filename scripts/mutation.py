"""Mutation testing of the core modules with mutmut 3 (`make mutation`; not part of `make test`: too slow for CI).

Each module is mutated in its own scratch copy of the project (build/mutation/<module>/) whose `setup.cfg` names
that module only and the test files that cover it, so a mutant runs against the relevant tests alone (mutmut
further narrows each mutant to the tests that call the mutated function). Results are appended to
build/mutation/<module>/result.json and docs/mutation-results.json (the last result of each module, committed) and
summarised, survivors listed, in docs/mutation-report.md.

    python scripts/mutation.py features probes            # one or more modules
    python scripts/mutation.py --report                    # rewrite the report from the stored results

Run one module at a time on a small shared machine (`--max-children 1`, the default here).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "mutation"
REPORT = ROOT / "docs" / "mutation-report.md"
# The last result of every module (counts and survivors), committed so that the report keeps the modules not re-run.
RESULTS = ROOT / "docs" / "mutation-results.json"

# module -> the test files that exercise it (the relevant tests only: the slow end-to-end files stay out).
MODULES: dict[str, dict] = {
    "features": {"path": "src/lvlmlp/probing/features.py",
                 "tests": ["tests/probing/test_probes.py", "tests/probing/test_features.py"]},
    # probes: MLPProbe's estimator (in probes.py) is tested beside its network, in test_mlp.py
    "probes": {"path": "src/lvlmlp/probing/probes.py",
               "tests": ["tests/probing/test_probes.py", "tests/probing/test_mlp.py", "tests/e2e/test_faults.py"]},
    "lda": {"path": "src/lvlmlp/probing/lda.py", "tests": ["tests/probing/test_probes.py"]},
    "metrics": {"path": "src/lvlmlp/probing/metrics.py", "tests": ["tests/probing/test_metrics.py"]},
    # store: the tests that run the tiny LLaVA (extraction through the store) are left out: with them a mutant of
    # RunWriter cost ~30 s here and the module ~7 hours; store.py alone is covered by the model-free ones.
    "store": {"path": "src/lvlmlp/extraction/store.py",
              "tests": ["tests/extraction/test_store.py"],
              "deselect": ["tests/extraction/test_store.py::test_resume_sends_only_uncommitted_rows_to_the_model",
                           "tests/extraction/test_store.py::test_short_answers_are_zero_padded_and_counted",
                           "tests/extraction/test_store.py::"
                           "test_layer_minus_one_and_hidden_equal_transformers_hidden_states"]},
    "steering": {"path": "src/lvlmlp/steering/guard.py", "tests": ["tests/steering/test_guard.py"]},
    "png": {"path": "src/lvlmlp/extraction/png.py", "tests": ["tests/extraction/test_png.py"]},
    # extract: the test that kills forked runs mid-way (SIGKILL, Ctrl-C) and resumes them is left out: a kill inside
    # mutmut's own forked mutant process would only slow its passes (tests/extraction/test_store.py covers resume).
    # (mutmut 3.8.1 once crashed here reaping a process it had not started: extract left its finished loader workers
    # unreaped, which loader.py now joins.)
    "extract": {"path": "src/lvlmlp/extraction/extract.py",
                "tests": ["tests/extraction/test_extract.py", "tests/extraction/test_store.py"],
                "deselect": ["tests/extraction/test_extract.py::"
                             "test_sigkill_and_ctrl_c_then_resume_equal_the_uninterrupted_run_also_for_shards",
                             # it runs the model on 2 torch threads: OpenMP's pool, already started in mutmut's
                             # parent, deadlocks in the forked mutant process (a hang, not a kill)
                             "tests/extraction/test_extract.py::test_model_threads_leave_cores_to_the_workers_on_cpu"]},
}
# Appended to the scratch copy's conftest.py. mutmut runs each mutant in a process forked from its own, and tqdm's
# write lock holds a multiprocessing lock (a semaphore every later fork inherits): a mutant killed at its timeout
# while printing a bar left it held, and every later mutant that printed one hung until its own timeout.
FORKED_CHILD_HOOK = """


def pytest_configure(config):
    import threading

    import tqdm

    tqdm.tqdm.set_lock(threading.RLock())  # this process's own lock (added by scripts/mutation.py)
"""
STATUSES = ("killed", "survived", "timeout", "suspicious", "no tests", "skipped", "segfault", "not checked")


def _prepare(name: str, resume: bool) -> Path:
    spec = MODULES[name]
    work = WORK / name
    if work.exists():
        # mutmut's cache (mutants/) keeps each mutant's status and which tests call which function: `resume` keeps
        # it so that an interrupted run goes on. Otherwise a run starts afresh: a kept cache let a mutant that new
        # tests kill stand as "survived" (they were not in its map of tests), and only the test map is dropped for
        # a retest of the survivors (mutmut maps the current tests again first).
        if not resume:
            shutil.rmtree(work / "mutants", ignore_errors=True)
        for sub in ("src", "tests", "configs", "examples"):
            shutil.rmtree(work / sub, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (work / "tests").mkdir()
    # tests/ is a package tree (tests.<folder>.<file>): every __init__.py and conftest.py comes with the files
    packages = [p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("*.py")
                if p.name in ("__init__.py", "conftest.py") and "fixtures" not in p.parts]
    for extra in [*packages, "tests/fixtures", "configs", "examples", *spec["tests"]]:
        src = ROOT / extra
        if src.is_dir():
            shutil.copytree(src, work / extra)
        elif src.exists():
            (work / extra).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, work / extra)
    with open(work / "tests" / "conftest.py", "a", encoding="utf-8") as conftest:
        conftest.write(FORKED_CHILD_HOOK)
    # mutmut reads [tool.mutmut] from pyproject.toml, else [mutmut] from setup.cfg: this copy has only the latter.
    selection = "\n    ".join(t for t in spec["tests"] if (ROOT / t).exists())
    (work / "setup.cfg").write_text(
        "[mutmut]\n"
        "source_paths = src\n"
        "also_copy =\n    configs\n    examples\n"  # test_faults.py runs a shipped config; test_extract.py the example backend
        f"only_mutate = {spec['path']}\n"
        f"pytest_add_cli_args_test_selection =\n    {selection}\n"
        "pytest_add_cli_args =\n    -p\n    no:cacheprovider\n"
        + "".join(f"    --deselect\n    {node}\n" for node in spec.get("deselect", []))
        # pyproject.toml stays out of this copy: its pytest marker, registered here
        + "\n[tool:pytest]\nmarkers =\n    mutation_guard: written against a surviving mutant\n"
    )
    return work


def run_module(name: str, max_children: int, retest_survivors: bool = False, resume: bool = False) -> dict:
    previous = WORK / name / "result.json"
    names, earlier = [], {}
    if retest_survivors and previous.exists():
        # Only the last run's survivors, against the current tests (written to kill them); the other mutants keep
        # their earlier status (mutmut reports them "not checked" after a run by name).
        last = json.loads(previous.read_text())
        earlier = last.get("statuses", {})
        names = [n for n, status in earlier.items() if status in ("survived", "no tests", "not checked")] or [
            s["name"] for s in last["survivors"]]
    work = _prepare(name, resume or bool(names))
    if names:  # a retest: the current tests are mapped again
        (work / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # mutmut puts mutants/src first itself
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    with open(work / "run.log", "a" if names else "w") as log:
        subprocess.run([mutmut, "run", "--max-children", str(max_children), *names], cwd=work, env=env, stdout=log,
                       stderr=subprocess.STDOUT, check=False)
    return collect(name, work, env, mutmut, earlier)


def _function_sources(path: Path) -> dict[str, list[str]]:
    """Every function of mutmut's trampolined copy of a module, by name (the mutants and `..._orig`)."""
    import ast

    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    out = {}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "__mutmut_" in node.name:
            out[node.name] = [ln.strip() for ln in lines[node.lineno - 1 : node.end_lineno]]
    return out


def _diff(functions: dict[str, list[str]], mutant: str) -> str:
    """The changed lines of one mutant against the original function (what `mutmut show` prints, but without
    starting mutmut once per mutant)."""
    import difflib

    local = mutant.rsplit(".", 1)[-1]
    orig = functions.get(local.rsplit("__mutmut_", 1)[0] + "__mutmut_orig")
    mut = functions.get(local)
    if orig is None or mut is None:
        return "(source not found)"
    body = list(difflib.unified_diff(orig[1:], mut[1:], lineterm="", n=0))[2:]
    return "\n".join(line for line in body if not line.startswith("@@")) or "(signature: " + mut[0] + ")"


def collect(name: str, work: Path, env: dict, mutmut: str, earlier: dict[str, str] | None = None) -> dict:
    """Counts and survivors of the last `mutmut run` in `work` into result.json; a mutant not checked by that run
    keeps its status in `earlier` (the run before a retest)."""
    res = subprocess.run([mutmut, "results", "--all", "true"], cwd=work, env=env, capture_output=True, text=True,
                         check=False)
    functions = _function_sources(work / "mutants" / MODULES[name]["path"])
    statuses: dict[str, str] = {}
    for line in res.stdout.splitlines():
        m = re.match(r"\s*(\S+): (.+)$", line)
        if m and m.group(2) in STATUSES:
            status = m.group(2)
            statuses[m.group(1)] = (earlier or {}).get(m.group(1), status) if status == "not checked" else status
    counts: dict[str, int] = {}
    for status in statuses.values():
        counts[status] = counts.get(status, 0) + 1
    survivors = [{"name": n, "status": status, "diff": _diff(functions, n)} for n, status in statuses.items()
                 if status in ("survived", "no tests")]
    tests = [t for t in MODULES[name]["tests"] if (ROOT / t).exists()]
    result = {"module": name, "path": MODULES[name]["path"], "tests": tests,
              "deselected": MODULES[name].get("deselect", []), "counts": counts, "survivors": survivors}
    (work / "result.json").write_text(json.dumps({**result, "statuses": statuses}, indent=1))
    stored = json.loads(RESULTS.read_text(encoding="utf-8")) if RESULTS.exists() else {}
    stored[name] = result
    RESULTS.write_text(json.dumps({k: stored[k] for k in MODULES if k in stored}, indent=1, ensure_ascii=False) + "\n",
                       encoding="utf-8")
    return result


def write_report() -> None:
    """docs/mutation-report.md from docs/mutation-results.json plus the hand-written equivalence notes."""
    notes_path = ROOT / "docs" / "mutation-equivalent.json"
    notes = json.loads(notes_path.read_text()) if notes_path.exists() else {}
    stored = json.loads(RESULTS.read_text(encoding="utf-8")) if RESULTS.exists() else {}
    lines = ["# Mutation-testing report", "",
             "Generated by `make mutation` (`scripts/mutation.py`, mutmut 3). Each module was mutated alone and",
             "each mutant run against the listed test files only. Killed = a test failed (or timed out) on the mutant.",
             "Survivors are listed with the reason they are equivalent (no observable behaviour changes) or",
             "left open. After new tests, `--retest-survivors` re-ran the survivors only; the other mutants keep the",
             "status of the run before.", "", "| module | tests | mutants | killed | survived | no tests | score |",
             "|---|---|---|---|---|---|---|"]
    details: list[str] = []
    notes_below: list[str] = []
    for name in MODULES:
        if name not in stored:
            lines.append(f"| {name} | - | not run | | | | |")
            continue
        r = stored[name]
        c = r["counts"]
        total = sum(v for k, v in c.items() if k not in ("skipped", "not checked"))
        killed = c.get("killed", 0) + c.get("timeout", 0)
        score = f"{100 * killed / total:.1f}%" if total else "-"
        if c.get("not checked"):
            notes_below.append(f"`{name}`: partial run, stopped after {total} of {total + c['not checked']} mutants "
                               "(the score is over the mutants checked; the others are not counted).")
        tests = ", ".join(Path(t).name for t in r["tests"])
        if r.get("deselected"):
            tests += f" (without {len(r['deselected'])} tests, see below)"
            notes_below.append(f"`{name}` ran without (why: scripts/mutation.py): " + ", ".join(
                f"`{t.split('::')[1]}`" for t in r["deselected"]) + ".")
        lines.append(f"| {name} | {tests} | {total} | {killed} | "
                     f"{c.get('survived', 0)} | {c.get('no tests', 0)} | {score} |")
        if r["survivors"]:
            details += [f"## {name}: surviving mutants", ""]
            for s in r["survivors"]:
                why = notes.get(s["name"], "open: no test distinguishes it yet")
                details += [f"### `{s['name']}` ({s['status']})", "", f"Reason: {why}", "", "```diff", s["diff"],
                            "```", ""]
    REPORT.write_text("\n".join(lines + [""] + [n + "\n" for n in notes_below] + details) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modules", nargs="*", help=f"modules to mutate: {', '.join(MODULES)} (default: all)")
    ap.add_argument("--report", action="store_true", help="only rewrite docs/mutation-report.md")
    ap.add_argument("--max-children", type=int, default=1)
    ap.add_argument("--collect", action="store_true",
                    help="only read the results of mutmut runs already made (e.g. one stopped early)")
    ap.add_argument("--retest-survivors", action="store_true",
                    help="re-run only the last run's surviving mutants (after adding tests that kill them)")
    ap.add_argument("--resume", action="store_true", help="go on with an interrupted run (keep mutmut's cache)")
    args = ap.parse_args()
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        ap.error(f"unknown module(s) {unknown}: choose from {', '.join(MODULES)}")
    if not args.report:
        for name in args.modules or list(MODULES):
            if args.collect:
                env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
                previous = WORK / name / "result.json"
                earlier = json.loads(previous.read_text()).get("statuses", {}) if previous.exists() else {}
                r = collect(name, WORK / name, env, str(Path(sys.executable).with_name("mutmut")), earlier)
            else:
                r = run_module(name, args.max_children, args.retest_survivors, args.resume)
            print(name, r["counts"], flush=True)
    write_report()
    print(f"wrote {REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
