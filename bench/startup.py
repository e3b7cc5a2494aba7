"""Start-up time of the command line (medians of N runs, each a fresh process; the goals of issue 11).

  --help, `probe train --help`, `tasks`  - absolute seconds (goals 0.6 / 0.6 / 1 s; `--help` 0.5 s for issue 13)
  extract                                - `lvlmlp extract` of one row on a tiny checkpoint, minus a bare
                                           `import torch, transformers` + `from_pretrained` of the same checkpoint
                                           (model and processor) and one prefill forward (goal: <= 1 s beyond)
  extract, finished run                  - the same command again: recognised as finished without loading weights

Run from the repository root: `python bench/startup.py [--repeats 3]`. The machine's load moves every figure; the
extract overhead is a difference of two medians measured alternately in the same minutes.
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


def timed(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    src = Path(__file__).resolve().parents[1] / "src"
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1")
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
