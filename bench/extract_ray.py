"""Benchmark: `extract --ray` with 1 and 2 replicas vs the single-process extractor, measured in one run.

Each engine extracts the same rows into a fresh run folder, the engines taking turns `--repeat` times (medians are
reported: on a shared machine the speed drifts by tens of percent from one minute to the next). The driver's writer is timed at every batch it receives
(`RunWriter.append`, wrapped here), so the steady rate excludes the start-up (Ray: starting the actors, importing,
loading the model in each replica), which is reported apart:
    rows/s (steady)  rows after the first batch / time from the first batch to the last
    start-up s       time to the first batch
    overhead/batch   Ray-1-replica seconds per batch - single-process seconds per batch (steady): what Ray Data adds
                     per batch (scheduling, the object store, moving the results to the driver)
On a GPU cluster, pass --device cuda --replicas 1,N to compare 1 and N GPUs (and --address auto to join it).

    python bench/extract_ray.py [--model DIR] [--rows 96] [--batch-size 8] [--replicas 1,2] [--repeat 3]
                                [--device cpu] [--geometry llava15] [--cpus N] [--address ADDR]
"""

from __future__ import annotations

import os

# Ray runs its workers with OMP_NUM_THREADS = their CPUs (1 here); the single-process extractor gets the same, or
# the comparison measures thread oversubscription on a small machine (it ran 20% slower without it here).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from extract_throughput import llava15_geometry, make_rows  # same directory: the same rows and geometry

from lvlmlp.extraction.backend import Backend
from lvlmlp.extraction.extract import BATCH_SIZE, extract
from lvlmlp.extraction.ray_extract import ray_extract
from lvlmlp.extraction.store import RunWriter
from lvlmlp.testing import tiny_model


def timed_run(fn) -> tuple[float, float, float]:
    """(start-up s, steady rows/s, steady s per batch) of one extraction, from the writer's batch arrival times."""
    arrivals: list[tuple[float, int]] = []
    append = RunWriter.append

    def timed_append(self, meta, arrays):
        arrivals.append((time.perf_counter(), len(meta)))
        return append(self, meta, arrays)

    RunWriter.append = timed_append
    try:
        t0 = time.perf_counter()
        fn()
    finally:
        RunWriter.append = append
    (t_first, _), (t_last, _) = arrivals[0], arrivals[-1]
    return t_first - t0, sum(n for _, n in arrivals[1:]) / (t_last - t_first), (t_last - t_first) / (len(arrivals) - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: a tiny LLaVA built here)")
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    ap.add_argument("--replicas", default="1,2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    ap.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local instance")
    ap.add_argument("--geometry", choices=["tiny", "llava15"], default="llava15",
                    help="tiny: 28 px images; llava15: 336 px, 576 image tokens per row (tiny layers)")
    args = ap.parse_args()
    replicas = [int(x) for x in args.replicas.split(",")]
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("lvlmlp").setLevel(logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="lvlmlp-bench-ray-"))
    try:
        model = args.model or tiny_model("llava", tmp / "tiny-llava")
        if args.geometry == "llava15" and not args.model:
            model = llava15_geometry(model, tmp / "tiny-llava-336")
        rows = make_rows(tmp, args.rows)
        spec = {"model": str(model), "device": args.device, "dtype": "float32" if args.device == "cpu" else "auto"}
        common = {"batch_size": args.batch_size, "progress": False}
        t0 = time.perf_counter()
        if args.address:
            ray.init(address=args.address, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING)
        t_init = time.perf_counter() - t0
        resources = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        runs: dict[str, list[tuple[float, float, float]]] = {}
        for i in range(args.repeat):
            runs.setdefault("single process", []).append(timed_run(
                lambda i=i: extract(Backend(**spec), rows, tmp / f"single{i}", workers=0, **common)))
            for k in replicas:
                runs.setdefault(f"ray, {k} replica(s)", []).append(timed_run(
                    lambda i=i, k=k: ray_extract(spec, rows, tmp / f"ray{k}-{i}", ray={"replicas": k}, **common)))
        ray.shutdown()
        results = {name: tuple(float(np.median(col)) for col in zip(*values)) for name, values in runs.items()}

        print(f"model {model} ({args.geometry}), device {args.device}, {args.rows} rows, batch {args.batch_size}, "
              f"medians of {args.repeat}; "
              f"Ray {ray.__version__} with {resources}, connected in {t_init:.1f} s")
        print(f"{'engine':<22}{'rows/s (steady)':>16}{'start-up s':>12}{'s/batch':>10}")
        for name, (startup, rate, per_batch) in results.items():
            print(f"{name:<22}{rate:>16.2f}{startup:>12.1f}{per_batch:>10.3f}")
        _, _, base = results["single process"]
        for name, (_, _, per_batch) in results.items():
            if name.startswith("ray"):
                print(f"{name}: steady rows/s x{base / per_batch:.2f} of the single process"
                      + (f"; overhead per batch {1000 * (per_batch - base):+.0f} ms" if name.startswith("ray, 1 ")
                         else ""))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
