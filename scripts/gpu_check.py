"""GPU checks (run on a machine with CUDA; CI never runs this): the code paths the CPU suite cannot reach.

1. Every tiny family on CUDA: batched `extract` first-token logits equal per-sample `generate(output_logits)`
   (float32; TF32 off), and a bfloat16 extraction runs and stays close to float32.
2. Throughput on a randomly initialised model of real size (LLaVA-1.5-7B's shapes unless --small): the paper's way,
   `lvlmlp extract`, and the bare forward, as in bench/extract_throughput.py.
3. `MultinomialProbe` trains on CUDA, and `ProbeGuard` steers a CUDA batch.
4. The image processor on the device (issue 31): LLaVA-1.5's geometry (336 px), batches of 16 prepared by the
   processor on the CPU (as the data-loader workers do) and with `device=` (torchvision's resize and normalise on
   the GPU, in the main process: forked workers cannot use CUDA), seconds per batch and the largest difference of
   the pixels: whether it measures faster, and whether it is exact.

    python scripts/gpu_check.py [--out DIR] [--skip-big]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def rows_for(root: Path, n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        h, w = int(rng.integers(40, 200)), int(rng.integers(40, 200))
        path = root / f"{seed}-{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path)
        q = " ".join(["what", "is", "the", "colour", "of", "this", "shape"][: 2 + i % 6]) + "?"
        rows.append({"id": f"r{i}", "image": str(path), "question": q, "label": int(rng.integers(0, 2))})
    return rows


def check_families(tmp: Path, report: dict, device: str) -> None:
    from lvlmlp.data import load_image
    from lvlmlp.extraction.backend import Backend
    from lvlmlp.extraction.extract import extract
    from lvlmlp.extraction.families import quirks_of
    from lvlmlp.testing import FAMILIES, SPECS, tiny_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = rows_for(tmp, 8)
    for family in FAMILIES:
        t0 = time.perf_counter()
        if quirks_of(SPECS[family].model_type).refused:  # the backend refuses it (docs/models.md)
            report["families"][family] = {"refused": quirks_of(SPECS[family].model_type).refused}
            continue
        try:
            ckpt = tiny_model(family, tmp / family)
            b = Backend(ckpt, device=device, dtype="float32")
            run = extract(b, rows, tmp / f"run-{family}", batch_size=4, store_dtype="float32", progress=False)
            diffs = []
            for i, row in enumerate(rows):
                single = b.encode([load_image(row["image"])], [row["question"]])
                out = b.model.generate(**single, max_new_tokens=1, do_sample=False, output_logits=True,
                                       return_dict_in_generate=True)
                diffs.append(float(np.abs(out.logits[0][0].float().cpu().numpy() - run.logits(0)[i]).max()))
            bf = Backend(ckpt, device=device, dtype="bfloat16")
            run_bf = extract(bf, rows, tmp / f"bf-{family}", batch_size=4, max_new_tokens=3, progress=False)
            report["families"][family] = {
                "max_abs_diff_fp32": max(diffs), "ok": max(diffs) < 1e-4,
                "bf16_vs_fp32_max_abs": float(np.abs(run_bf.logits(0).astype(np.float32) - run.logits(0)).max()),
                "bf16_responses": run_bf.responses[:2], "seconds": round(time.perf_counter() - t0, 2),
            }
        except Exception as err:  # keep going: one report for all families
            report["families"][family] = {"error": f"{type(err).__name__}: {err}"}
        print(family, report["families"][family], flush=True)


def big_throughput(tmp: Path, report: dict, rows_n: int, small: bool, device: str) -> None:
    """A random LLaVA of real size (no weights are downloadable here), saved and loaded like any checkpoint."""
    from extract_throughput import bare_forward, paper_way
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from lvlmlp.extraction.backend import Backend
    from lvlmlp.extraction.extract import extract
    from lvlmlp.testing import tiny_model

    src = tiny_model("llava", tmp / "tok")  # tokenizer + processor + chat template of the tiny family
    if device == "cpu":  # a dry run of this function's logic with a small model
        text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=2, vocab_size=32064)
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=336, patch_size=14, projection_dim=32)
    else:
        text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=8 if small else 32,
                           num_attention_heads=32, num_key_value_heads=32, vocab_size=32064)
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(src)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=proc.tokenizer.convert_tokens_to_ids(
        proc.image_token), vision_feature_layer=-2)
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16 directly: half the memory and time
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg)
    torch.set_default_dtype(torch.float32)
    out = tmp / "big"
    model.save_pretrained(out)
    proc.image_processor.size = {"shortest_edge": 336}
    proc.image_processor.crop_size = {"height": 336, "width": 336}
    proc.patch_size = 14
    proc.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    b = Backend(out, device=device, dtype="bfloat16")
    rows = rows_for(tmp, rows_n, seed=1)
    bare_forward(b, rows[:16], 16)
    t_a = paper_way(b, rows[:16], tmp / "paper.jsonl") * len(rows) / 16
    t0 = time.perf_counter()
    extract(b, rows, tmp / "bigrun", batch_size=16, progress=False)
    t_b = time.perf_counter() - t0
    t_c, _ = bare_forward(b, rows, 16)
    report["throughput"] = {"layers": text.num_hidden_layers, "rows": len(rows), "paper_rows_per_s": len(rows) / t_a,
                            "extract_rows_per_s": len(rows) / t_b, "bare_rows_per_s": len(rows) / t_c,
                            "b_over_a": t_a / t_b, "b_over_c": t_c / t_b, "gpu": torch.cuda.get_device_name() if device != "cpu" else "cpu"}
    print(report["throughput"], flush=True)


def probes_and_guard(tmp: Path, report: dict, device: str) -> None:
    from lvlmlp.data import load_image
    from lvlmlp.extraction.backend import Backend
    from lvlmlp.extraction.store import open_run
    from lvlmlp.probing.probes import LogisticProbe, MultinomialProbe
    from lvlmlp.steering.guard import ProbeGuard, guarded_generate

    rng = np.random.default_rng(0)
    y = rng.integers(0, 50, 20000)
    centers = rng.normal(size=(50, 256)).astype(np.float32)
    X = centers[y] + rng.normal(scale=1.0, size=(20000, 256)).astype(np.float32)
    t0 = time.perf_counter()
    p = MultinomialProbe(device=device, epochs=5).fit(X[:16000], y[:16000])
    report["multinomial_cuda"] = {"accuracy": float((p.predict(X[16000:]) == y[16000:]).mean()),
                                  "seconds": round(time.perf_counter() - t0, 2)}
    run = open_run(tmp / "run-llava")
    b = Backend(tmp / "llava", device=device, dtype="float32")
    X0 = np.asarray(run.logits(0), dtype=np.float32)
    labels = np.array([0, 1] * 4)
    probe = LogisticProbe().fit(X0, labels)
    guard = ProbeGuard(probe, b.tokenizer, "Sorry, I cannot")
    rows = [json.loads(json.dumps(m)) for m in run.meta]
    batch = b.encode([load_image(r) for r in sorted(tmp.glob("0-*.png"), key=lambda p: int(p.stem[2:]))][:8],
                     [m["question"] for m in rows])
    guarded_generate(b.model, batch, guard, max_new_tokens=6, do_sample=False)
    report["guard_cuda"] = {"flagged": guard.flagged_.tolist(),
                            "score_diff": float(np.abs(guard.scores_ - probe.predict_proba(X0)[:, 1]).max())}
    print(report["guard_cuda"], report["multinomial_cuda"], flush=True)


def processor_on_device(tmp: Path, report: dict, device: str, batches: int = 20) -> None:
    """The fast image processor run on `device` (its `device=` keyword) against the CPU, on LLaVA-1.5's geometry."""
    from lvlmlp.data import load_image
    from lvlmlp.extraction.backend import Backend
    from lvlmlp.testing import tiny_model

    backend = Backend(tiny_model("llava", tmp / "proc"), device="cpu", load_model=False)  # its processor and prompt
    proc = backend.processor
    proc.image_processor.size = {"shortest_edge": 336}
    proc.image_processor.crop_size = {"height": 336, "width": 336}
    proc.patch_size = 14
    rows = rows_for(tmp, 16, seed=2)
    images = [load_image(r["image"]) for r in rows]
    texts = [backend.prompt(r["question"]) for r in rows]
    timings: dict[str, float] = {}
    pixels = {}
    for where in ("cpu", device):
        kwargs = {} if where == "cpu" else {"device": where}
        proc(images=images, text=texts, padding=True, return_tensors="pt", **kwargs)  # warm-up
        if where != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(batches):
            out = proc(images=images, text=texts, padding=True, return_tensors="pt", **kwargs)
            if where != "cpu":
                torch.cuda.synchronize()
        timings[where] = (time.perf_counter() - t0) / batches
        pixels[where] = out["pixel_values"].float().cpu()
    report["processor_on_device"] = {
        "batch": len(rows), "cpu_s_per_batch": round(timings["cpu"], 5),
        "device_s_per_batch": round(timings[device], 5), "device": device,
        "max_abs_pixel_difference": float((pixels["cpu"] - pixels[device]).abs().max()),
    }
    print(report["processor_on_device"], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--small", action="store_true", help="8 decoder layers instead of 32 for the throughput model")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself")
    args = ap.parse_args()
    report: dict = {"families": {}, "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    tmp = Path(tempfile.mkdtemp(prefix="lvlmlp-gpu-"))
    for step in (lambda: check_families(tmp, report, args.device), lambda: probes_and_guard(tmp, report, args.device),
                 lambda: processor_on_device(tmp, report, args.device),
                 lambda: None if args.skip_big else big_throughput(tmp, report, args.rows, args.small, args.device)):
        try:
            step()
        except Exception as err:
            report.setdefault("errors", []).append(f"{type(err).__name__}: {err}")
            print("ERROR", err, flush=True)
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(text)


if __name__ == "__main__":
    main()
