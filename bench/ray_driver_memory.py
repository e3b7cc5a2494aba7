"""Benchmark: the Ray driver's memory does not grow with the number of rows (issue 16's "measure and choose").

`extract --ray` streams the replicas' results to the driver (`iter_batches`), which writes them with the same
RunWriter as the single-process extractor. If the driver held every result, its peak RSS would grow by the size of
the logits; streamed, it stays flat. A tiny LLaVA whose output head is widened to a real vocabulary (32,000, so each
row's logits are 64 KB in float16 and 2,048 rows are 128 MB) extracts N rows on a local Ray instance in a fresh
process per N, and the single-process extractor the same way (same writer and consolidation, which maps the
arrays it writes): each process prints its peak RSS (ru_maxrss) and the size of the logits it wrote. The Ray
driver's growth with N minus the single process's is what the driver would add by holding results.

    python bench/ray_driver_memory.py [--rows 256,2048] [--vocab 32000] [--replicas 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def child(engine: str, model: str, rows: int, out: str, replicas: int) -> None:
    from extract_throughput import make_rows  # same directory: the same rows

    data = Path(out) / "images"
    data.mkdir(parents=True)
    items = make_rows(data, rows)
    if engine == "ray":
        import ray

        from lvlmlp.extraction.ray_extract import ray_extract

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        run = ray_extract({"model": model, "device": "cpu", "dtype": "float32"}, items, Path(out) / "run",
                          ray={"replicas": replicas}, batch_size=8, progress=False)
        ray.shutdown()
    else:  # the single-process extractor: the same writer and consolidation, the model in this process
        from lvlmlp.extraction.backend import Backend
        from lvlmlp.extraction.extract import extract

        run = extract(Backend(model, device="cpu", dtype="float32"), items, Path(out) / "run", batch_size=8,
                      progress=False, workers=0)
    logits = os.path.getsize(Path(out) / "run" / "logits.npy")
    print(json.dumps({"rows": len(run), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "logits_mb": logits / 2**20}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="256,2048")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--child", nargs=4, metavar=("ENGINE", "MODEL", "ROWS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), args.child[3], args.replicas)
        return
    from transformers import AutoModelForImageTextToText

    from lvlmlp.testing import tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = tiny_model("llava", Path(tmp) / "tiny")
        model = AutoModelForImageTextToText.from_pretrained(ckpt)
        model.resize_token_embeddings(args.vocab)  # a real vocabulary's worth of logits per row
        model.save_pretrained(ckpt)
        print(f"tiny LLaVA, output head widened to {args.vocab} logits; float16 logits = "
              f"{args.vocab * 2 / 1024:.0f} KB per row; driver peak RSS per run (a fresh process each):")
        for engine in ("single", "ray"):
            for n in (int(x) for x in args.rows.split(",")):
                out = Path(tmp) / f"{engine}{n}"
                proc = subprocess.run([sys.executable, __file__, "--replicas", str(args.replicas), "--child", engine,
                                       str(ckpt), str(n), str(out)], capture_output=True, text=True,
                                      cwd=Path(__file__).parent)
                if proc.returncode:
                    sys.exit(proc.stderr[-3000:])
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"  {engine:>6} {res['rows']:>6} rows: peak RSS {res['peak_rss_mb']:.0f} MB, "
                      f"logits written {res['logits_mb']:.0f} MB")


if __name__ == "__main__":
    main()
