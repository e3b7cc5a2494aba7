"""Start-up time of the command line (medians of N runs, each a fresh process; the goals of issue 11).

  --help, `probe train --help`, `tasks`  - absolute seconds (goals 0.6 / 0.6 / 1 s; `--help` 0.5 s for issue 13)
  extract                                - `lvlmlp extract` of one row on a tiny checkpoint, minus a bare
                                           `import torch, transformers` + `from_pretrained` of the same checkpoint
                                           (model and processor) and one prefill forward (goal: <= 1 s beyond)
  extract, finished run                  - the same command again: recognised as finished without loading weights

Run from the repository root: `python bench/startup.py [--repeats 3]`. The machine's load moves every figure; the
extract overhead is a difference of two medians measured alternately in the same minutes.

`--first-batch` (issue 31) measures instead when each side reaches its first batch: `lvlmlp extract` of 16 rows
(two batches of 8, its default data-loader worker) through bench/first_batch.py, which records when each start-up
phase ended, against a bare script (`import torch, transformers`, `from_pretrained` of the processor and the model,
the chat template, one batch of 8 through the processor and `model(**batch, logits_to_keep=1)`), alternating,
`--repeats` fresh processes each (5 by default in this mode), medians of every phase, seconds since each process
started, with the load average at each start.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BARE = """
import sys, torch, transformers
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
torch.set_num_threads(1)
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1]).eval()
processor = AutoProcessor.from_pretrained(sys.argv[1])
conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "bright?"}]}]
text = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
batch = processor(images=[Image.open(sys.argv[2]).convert("RGB")], text=[text], return_tensors="pt")
with torch.no_grad():
    model(**batch, logits_to_keep=1)
"""


BARE_FIRST_BATCH = """
import json, sys
sys.path.insert(0, sys.argv[4])
from first_batch import mark
mark("python")
import torch
mark("import torch + lvlmlp.extraction")
import transformers
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
mark("import transformers' Auto classes")
processor = AutoProcessor.from_pretrained(sys.argv[1])
mark("processor")
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1]).eval()
mark("model weights")
processor.tokenizer.padding_side = "left"
rows = [json.loads(line) for line in open(sys.argv[2])][:8]
conv = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}] for r in rows]
texts = [processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conv]
batch = processor(images=[[Image.open(r["image"]).convert("RGB")] for r in rows], text=texts, padding=True,
                  return_tensors="pt")
with torch.inference_mode():
    model(**batch, logits_to_keep=1)
mark("first batch's forward")
from first_batch import marks
json.dump(marks, open(sys.argv[3], "w"))
"""


def first_batch(repeats: int, env: dict) -> None:
    """Seconds from process start to each start-up phase, lvlmlp extract vs the bare script (medians)."""
    import tempfile

    bench = Path(__file__).resolve().parent
    sys.path.insert(0, str(bench))
    sys.path.insert(0, env["PYTHONPATH"].split(os.pathsep)[0])
    from extract_throughput import make_rows

    from lvlmlp.testing import tiny_model

    sides: dict[str, list[dict]] = {"bare": [], "lvlmlp": []}
    loads: dict[str, list[float]] = {"bare": [], "lvlmlp": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = tiny_model("llava", root / "tiny")
        (root / "img").mkdir()
        manifest = root / "rows.jsonl"
        manifest.write_text("".join(json.dumps(r) + "\n" for r in make_rows(root / "img", 16)))
        for i in range(repeats):
            for side in ("bare", "lvlmlp") if i % 2 == 0 else ("lvlmlp", "bare"):
                out = root / f"{side}{i}.json"
                if side == "bare":
                    argv = [sys.executable, "-c", BARE_FIRST_BATCH, str(model), str(manifest), str(out), str(bench)]
                else:
                    argv = [sys.executable, str(bench / "first_batch.py"), "extract", "--model", str(model), "--data",
                            str(manifest), "--out", str(root / f"run{i}"), "--no-progress"]
                loads[side].append(round(os.getloadavg()[0], 2))
                subprocess.run(argv, check=True, env=dict(env, LVLMLP_PHASES=str(out)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
                sides[side].append(json.loads(out.read_text()))
    names = list(dict.fromkeys(k for side in ("lvlmlp", "bare") for m in sides[side] for k in m))
    print(f"seconds since process start, medians of {repeats} (load average at each start: bare {loads['bare']}, "
          f"lvlmlp {loads['lvlmlp']})")
    print(f"{'phase ended':40} {'bare':>7} {'lvlmlp':>7}")
    for name in names:
        cells = [statistics.median(m[name] for m in sides[s]) if all(name in m for m in sides[s]) else None
                 for s in ("bare", "lvlmlp")]
        print(f"{name:40} " + " ".join(f"{c:7.3f}" if c is not None else f"{'':7}" for c in cells))
    key = "first batch's forward"
    gaps = sorted(m[key] for m in sides["lvlmlp"])
    print(f"first batch: lvlmlp {statistics.median(gaps):.3f} s vs bare "
          f"{statistics.median(m[key] for m in sides['bare']):.3f} s: "
          f"{statistics.median(gaps) - statistics.median(m[key] for m in sides['bare']):+.3f} s (goal <= +0.5); "
          f"per pair: {[round(a[key] - b[key], 3) for a, b in zip(sides['lvlmlp'], sides['bare'])]}")


def timed(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=None, help="fresh processes per side (default 3; 5 with "
                    "--first-batch)")
    ap.add_argument("--first-batch", action="store_true", help="time to the first batch, phase by phase (issue 31)")
    args = ap.parse_args()
    src = Path(__file__).resolve().parents[1] / "src"
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1")
    if args.first_batch:
        first_batch(args.repeats or 5, env)
        return
    args.repeats = args.repeats or 3
    cli = [sys.executable, "-m", "lvlmlp.cli"]
    results: dict[str, float] = {}
    for name, argv in (("--help", ["--help"]), ("probe train --help", ["probe", "train", "--help"]),
                       ("tasks", ["tasks"])):
        results[name] = statistics.median(timed([*cli, *argv], env) for _ in range(args.repeats))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subprocess.run([*cli, "tiny-model", "--family", "llava", "--out", str(root / "tiny")], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run([*cli, "tiny-data", "--out", str(root / "data"), "--n-train", "1", "--n-test", "0"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        manifest = root / "data" / "manifest.jsonl"
        image = root / "data" / "img" / "train0.png"
        bare, ours, again = [], [], []
        for i in range(args.repeats):
            bare.append(timed([sys.executable, "-c", BARE, str(root / "tiny"), str(image)], env))
            out = root / f"run{i}"
            extract = [*cli, "extract", "--model", str(root / "tiny"), "--data", str(manifest), "--out", str(out),
                       "--device", "cpu", "--workers", "0", "--no-progress"]
            ours.append(timed(extract, env))
            again.append(timed(extract, env))
            shutil.rmtree(out)
    results["bare import + from_pretrained + forward"] = statistics.median(bare)
    results["extract (1 row)"] = statistics.median(ours)
    results["extract overhead beyond bare"] = results["extract (1 row)"] - results["bare import + from_pretrained + forward"]
    results["extract, finished run"] = statistics.median(again)
    print(json.dumps({k: round(v, 3) for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
