"""Benchmark: `extract --ray` with 1 and 2 replicas vs the single-process extractor, measured in one run.

Each engine extracts the same rows twice, a short and a long run (fresh run folders), end to end with the model load
(in-process for the single-process extractor; in every replica for Ray). From the two wall times:
    rows/s (steady) = (long - short rows) / (long - short seconds)   the start-up costs cancel out
    start-up s      = wall time of the short run - its rows / steady rate   (Ray: actors start, import, load model)
    overhead/batch  = Ray-1-replica seconds per batch - single-process seconds per batch (steady state): what Ray Data
                      adds per batch (scheduling, object store, moving the results to the driver)
On a GPU cluster, pass --device cuda and --replicas 1,N to compare 1 and N GPUs.

    python bench/extract_ray.py [--model DIR] [--rows 16,80] [--batch-size 8] [--replicas 1,2] [--device cpu]
                                [--geometry llava15] [--cpus N]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import ray
import torch
from extract_throughput import llava15_geometry, make_rows  # same directory: the same rows and geometry

from lvlmlp.backend import Backend
from lvlmlp.extract import BATCH_SIZE, extract
from lvlmlp.ray_extract import ray_extract
from lvlmlp.testing import tiny_model


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: a tiny LLaVA built here)")
    ap.add_argument("--rows", default="16,80", help="the short and the long run's rows")
    ap.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    ap.add_argument("--replicas", default="1,2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    ap.add_argument("--geometry", choices=["tiny", "llava15"], default="llava15",
                    help="tiny: 28 px images; llava15: 336 px, 576 image tokens per row (tiny layers)")
    args = ap.parse_args()
    short, long = (int(x) for x in args.rows.split(","))
    replicas = [int(x) for x in args.replicas.split(",")]
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("lvlmlp").setLevel(logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="lvlmlp-bench-ray-"))
    try:
        model = args.model or tiny_model("llava", tmp / "tiny-llava")
        if args.geometry == "llava15" and not args.model:
            model = llava15_geometry(model, tmp / "tiny-llava-336")
        rows = make_rows(tmp, long)
        dtype = "float32" if args.device == "cpu" else "auto"
        spec = {"model": str(model), "device": args.device, "dtype": dtype}
        common = {"batch_size": args.batch_size, "progress": False}

        def single(n: int, tag: str) -> float:
            return timed(lambda: extract(Backend(**spec), rows[:n], tmp / tag, workers=0, **common))

        t0 = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING)
        t_init = time.perf_counter() - t0
        resources = ray.cluster_resources()

        def on_ray(n: int, tag: str, k: int) -> float:
            return timed(lambda: ray_extract(spec, rows[:n], tmp / tag, ray={"replicas": k}, **common))

        results = {"single process": (single(short, "s1"), single(long, "s2"))}
        for k in replicas:
            results[f"ray, {k} replica(s)"] = (on_ray(short, f"r{k}a", k), on_ray(long, f"r{k}b", k))
        ray.shutdown()

        batches = (long - short) / args.batch_size
        print(f"model {model} ({args.geometry}), device {args.device}, batch {args.batch_size}, rows {short} and "
              f"{long}; local Ray instance {dict(resources)} started in {t_init:.1f} s")
        print(f"{'engine':<22}{'rows/s (steady)':>16}{'start-up s':>12}{'s/batch':>10}")
        per_batch = {}
        for name, (t_short, t_long) in results.items():
            rate = (long - short) / (t_long - t_short)
            per_batch[name] = (t_long - t_short) / batches
            print(f"{name:<22}{rate:>16.2f}{t_short - short / rate:>12.1f}{per_batch[name]:>10.3f}")
        base = results["single process"]
        for name, (t_short, t_long) in results.items():
            if name.startswith("ray"):
                ratio = (base[1] - base[0]) / (t_long - t_short)
                print(f"{name}: steady rows/s x{ratio:.2f} of single process; overhead per batch "
                      f"{1000 * (per_batch[name] - per_batch['single process']):+.0f} ms"
                      + (" (with 1 replica: what Ray adds)" if name.startswith("ray, 1 ") else ""))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
