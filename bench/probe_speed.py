"""From data on disk to metrics: lvlmlp's run folder + probes vs the paper's JSON-lines + scikit-learn workflow.

Binary task (default 10,000 rows x 32,000 logits, a learnable signal on a few hundred tokens):
  ours   - run folder (float16 memory map) -> LogisticProbe() -> AUROC
  paper  - JSON lines with the logits as text, parsed with `json` -> LogisticRegression() -> AUROC
Multiclass task (default 50,000 rows x 4,096 dims, 1,000 classes):
  ours   - float16 memory map -> MultinomialProbe (mini-batches) -> top-1 accuracy
  paper  - the same features in RAM -> LinearDiscriminantAnalysis() (the paper's ImageNet notebook) -> accuracy

ImageNet protocol (--lda-classes 1000 --lda-dim 32000: 16 training rows per class, 16,000 x 32,000):
  ours   - LDAProbe() (the svd LDA's coefficients in torch: a Gram matrix and Cholesky solves; --device cuda)
  paper  - LinearDiscriminantAnalysis() on float32 features, as the ImageNet notebook
  and whether both predict the same class for every test row.

Each side runs in its own subprocess so its wall time and peak memory (ru_maxrss) are its own. Data generation is
not timed. Full sizes need tens of GB of disk and RAM for the paper's side; try small flags first, e.g.
`python bench/probe_speed.py --n 1000 --vocab 4000 --mc-n 4000 --mc-dim 256 --mc-classes 50`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CHUNK = 500


# ---------------------------------------------------------------- data generation (untimed)
def binary_rows(n: int, vocab: int, seed: int):
    """Chunks of (logits float32, labels); label 1 shifts 300 'answerable' tokens up, as a weak linear signal."""
    rng = np.random.default_rng(seed)
    signal = rng.choice(vocab, size=min(300, vocab), replace=False)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        y = rng.integers(0, 2, m)
        x = rng.normal(size=(m, vocab)).astype(np.float32) * 2.0
        x[:, signal] += 0.15 * (2 * y[:, None] - 1)
        yield x, y


def write_binary(data: Path, n: int, vocab: int, seed: int) -> None:
    from lvlmlp.extraction.store import RunWriter

    writer = RunWriter(data / "run", {"model": "synthetic", "family": "bench", "dtype": "float16",
                                      "vocab_size": vocab, "prompt_template": None, "max_new_tokens": 1,
                                      "hidden": False, "layers": []}, shard_size=CHUNK)
    with (data / "paper.jsonl").open("w") as f:
        i = 0
        for x, y in binary_rows(n, vocab, seed):
            meta = []
            for row, label in zip(x, y):
                split = "train" if i % 5 else "test"
                meta.append({"id": str(i), "label": int(label), "split": split})
                # The paper writes `logits.tolist()` of the model's float16 logits: float16 values as text.
                f.write(json.dumps({"image": f"{i}.jpg", "model_name": "synthetic", "question": "q", "label": int(label),
                                    "split": split, "response": "", "output_ids": [],
                                    "logits": row.astype(np.float16).astype(np.float32).tolist()}) + "\n")
                i += 1
            writer.append(meta, {"logits": x[:, None, :].astype(np.float16),
                                 "n_tokens": np.ones(len(y), dtype=np.int64), "row_index": np.arange(i - len(y), i)})
    writer.close()


def write_multiclass(data: Path, n: int, dim: int, classes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)).astype(np.float32) * 0.35
    x = np.lib.format.open_memmap(data / "mc_x.npy", mode="w+", dtype=np.float16, shape=(n, dim))
    y = rng.integers(0, classes, n)
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        x[start:stop] = means[y[start:stop]] + rng.normal(size=(stop - start, dim)).astype(np.float32)
    x.flush()
    np.save(data / "mc_y.npy", y)


# ---------------------------------------------------------------- timed workers (one per subprocess)
def worker_binary_ours(data: Path, args: argparse.Namespace) -> dict:
    from sklearn.metrics import roc_auc_score

    from lvlmlp.extraction.store import open_run
    from lvlmlp.probing.features import feature_matrix
    from lvlmlp.probing.probes import LogisticProbe

    run = open_run(data / "run")
    train = np.array([s == "train" for s in run.splits])
    y = run.labels.astype(np.int64)
    probe = LogisticProbe().fit(feature_matrix(run, rows=train), y[train])
    score = probe.positive_score(feature_matrix(run, rows=~train))
    return {"auroc": roc_auc_score(y[~train], score), "converged": probe.fit_info_["converged"]}


def worker_binary_paper(data: Path, args: argparse.Namespace) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    x, y, split = [], [], []
    with (data / "paper.jsonl").open() as f:  # as utils/func.py read_data does
        for line in f:
            row = json.loads(line)
            x.append(row["logits"])
            y.append(row["label"])
            split.append(row["split"])
    x, y = np.array(x), np.array(y)
    train = np.array(split) == "train"
    clf = LogisticRegression().fit(x[train], y[train])
    return {"auroc": roc_auc_score(y[~train], clf.predict_proba(x[~train])[:, 1])}


def worker_mc_ours(data: Path, args: argparse.Namespace) -> dict:
    from lvlmlp.probing.probes import MultinomialProbe

    x = np.load(data / "mc_x.npy", mmap_mode="r")
    y = np.load(data / "mc_y.npy")
    cut = int(len(y) * 0.8)
    probe = MultinomialProbe(epochs=args.epochs, batch_size=1024, device=args.device).fit(x[:cut], y[:cut])
    return {"accuracy": float(np.mean(probe.predict(x[cut:]) == y[cut:]))}


def worker_mc_paper(data: Path, args: argparse.Namespace) -> dict:
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    x = np.load(data / "mc_x.npy").astype(np.float32)
    y = np.load(data / "mc_y.npy")
    cut = int(len(y) * 0.8)
    clf = LinearDiscriminantAnalysis().fit(x[:cut], y[:cut])
    return {"accuracy": float(np.mean(clf.predict(x[cut:]) == y[cut:]))}


def write_lda(data: Path, classes: int, dim: int, seed: int) -> None:
    """16 training rows and 4 test rows per class, float32 (the notebook's torch.Tensor features)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)).astype(np.float32) * 0.3
    for name, per in (("train", 16), ("test", 4)):
        y = np.repeat(np.arange(classes), per)
        x = np.lib.format.open_memmap(data / f"lda_{name}_x.npy", mode="w+", dtype=np.float32, shape=(y.size, dim))
        for start in range(0, y.size, CHUNK):
            stop = min(y.size, start + CHUNK)
            x[start:stop] = means[y[start:stop]] + rng.normal(size=(stop - start, dim)).astype(np.float32)
        x.flush()
        np.save(data / f"lda_{name}_y.npy", y)


def _lda_worker(data: Path, make: Any, tag: str) -> dict:
    x, y = np.load(data / "lda_train_x.npy"), np.load(data / "lda_train_y.npy")
    clf = make().fit(x, y)
    pred = clf.predict(np.load(data / "lda_test_x.npy"))
    np.save(data / f"lda_pred_{tag}.npy", pred)
    return {"accuracy": float(np.mean(pred == np.load(data / "lda_test_y.npy")))}


def worker_lda_ours(data: Path, args: argparse.Namespace) -> dict:
    from lvlmlp.probing.probes import LDAProbe

    return _lda_worker(data, lambda: LDAProbe(device=args.device), "ours")


def worker_lda_paper(data: Path, args: argparse.Namespace) -> dict:
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    return _lda_worker(data, LinearDiscriminantAnalysis, "paper")


WORKERS = {"binary-ours": worker_binary_ours, "binary-paper": worker_binary_paper,
           "mc-ours": worker_mc_ours, "mc-paper": worker_mc_paper,
           "lda-ours": worker_lda_ours, "lda-paper": worker_lda_paper}


def run_worker(name: str, data: Path, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv, "--data", str(data), "--worker", name],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="binary task rows")
    parser.add_argument("--vocab", type=int, default=32_000, help="binary task logits per row")
    parser.add_argument("--mc-n", type=int, default=50_000, help="multiclass rows")
    parser.add_argument("--mc-dim", type=int, default=4_096, help="multiclass feature dim")
    parser.add_argument("--mc-classes", type=int, default=1_000, help="multiclass classes")
    parser.add_argument("--epochs", type=int, default=10, help="MultinomialProbe epochs")
    parser.add_argument("--device", default="cpu", help="MultinomialProbe device (cpu, cuda)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lda-classes", type=int, default=1_000, help="LDA (ImageNet protocol) classes, 16 rows each")
    parser.add_argument("--lda-dim", type=int, default=32_000, help="LDA feature dim")
    parser.add_argument("--skip", choices=("binary", "multiclass", "lda"), action="append", default=[])
    parser.add_argument("--data", type=Path, help="data folder (default: a temporary one)")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.worker:
        t0 = time.perf_counter()
        result = WORKERS[args.worker](args.data, args)
        result["seconds"] = time.perf_counter() - t0
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    passthrough = [a for a in sys.argv[1:] if not a.startswith("--data")]
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp)
        data.mkdir(parents=True, exist_ok=True)
        if "binary" not in args.skip:
            print(f"binary: generating {args.n} x {args.vocab} ...", flush=True)
            write_binary(data, args.n, args.vocab, args.seed)
            size = (data / "paper.jsonl").stat().st_size / 2**20
            ours, paper = (run_worker(w, data, passthrough) for w in ("binary-ours", "binary-paper"))
            print(f"  paper: JSON lines ({size:.0f} MiB) + LogisticRegression(): {paper['seconds']:.2f} s, "
                  f"peak {paper['peak_rss_mb']:.0f} MiB, AUROC {paper['auroc']:.4f}")
            print(f"  ours : run folder memmap + LogisticProbe():           {ours['seconds']:.2f} s, "
                  f"peak {ours['peak_rss_mb']:.0f} MiB, AUROC {ours['auroc']:.4f}")
            diff = abs(ours["auroc"] - paper["auroc"])
            print(f"  speed-up {paper['seconds'] / ours['seconds']:.1f}x (goal >= 10x); "
                  f"AUROC difference {diff:.5f} ({'ok' if diff <= 0.005 else 'ABOVE 0.005'})")
        if "multiclass" not in args.skip:
            print(f"multiclass: generating {args.mc_n} x {args.mc_dim}, {args.mc_classes} classes ...", flush=True)
            write_multiclass(data, args.mc_n, args.mc_dim, args.mc_classes, args.seed)
            ours, paper = (run_worker(w, data, passthrough) for w in ("mc-ours", "mc-paper"))
            print(f"  paper: LinearDiscriminantAnalysis(): {paper['seconds']:.2f} s, "
                  f"peak {paper['peak_rss_mb']:.0f} MiB, accuracy {paper['accuracy']:.4f}")
            print(f"  ours : MultinomialProbe ({args.device}): {ours['seconds']:.2f} s, "
                  f"peak {ours['peak_rss_mb']:.0f} MiB, accuracy {ours['accuracy']:.4f}")
            print(f"  speed-up {paper['seconds'] / ours['seconds']:.1f}x")
        if "lda" not in args.skip:
            n = 16 * args.lda_classes
            print(f"lda: generating {n} x {args.lda_dim} (16 per class, {args.lda_classes} classes) ...", flush=True)
            write_lda(data, args.lda_classes, args.lda_dim, args.seed)
            ours, paper = (run_worker(w, data, passthrough) for w in ("lda-ours", "lda-paper"))
            same = np.array_equal(np.load(data / "lda_pred_ours.npy"), np.load(data / "lda_pred_paper.npy"))
            print(f"  paper: LinearDiscriminantAnalysis() (svd): {paper['seconds']:.2f} s, "
                  f"peak {paper['peak_rss_mb']:.0f} MiB, accuracy {paper['accuracy']:.4f}")
            print(f"  ours : LDAProbe() ({args.device}):          {ours['seconds']:.2f} s, "
                  f"peak {ours['peak_rss_mb']:.0f} MiB, accuracy {ours['accuracy']:.4f}")
            print(f"  speed-up {paper['seconds'] / ours['seconds']:.1f}x (goal >= 10x); "
                  f"identical predictions: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
