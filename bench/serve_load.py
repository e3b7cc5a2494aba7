"""`lvlmlp serve` under load: requests/s and p50/p95 latency at 1, 8 and 32 concurrent clients, against
one-at-a-time guarded generation with the same model in one process (no server: `Backend.encode` +
`guarded_generate`, one request after the other), measured before and after the server runs (a shared machine's
speed drifts; the ratios use the mean of the two).

The server runs as `lvlmlp serve` in its own process (its start-up is not timed); the clients are one asyncio loop
of `httpx` in this process, each client sending its next request when the previous one is answered. Every request
is a different random image and question, greedy, `--max-tokens` tokens; the answers at every concurrency are
checked to equal the one-at-a-time answers. Default model: the demo model, with a probe fitted here on its
first-token logits of random rows (alternating labels, so that some requests are flagged), or `--probe DIR`.

    python bench/serve_load.py                      # demo model, 96 requests, max_tokens 16
    python bench/serve_load.py --model llava-hf/llava-1.5-7b-hf --probe probes/safety --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

QUESTIONS = ["What is in the image?", "What color is the shape?", "How many objects are there?",
             "Is there a circle in the image?", "Describe the image in one sentence."]


def make_requests(n: int, seed: int) -> list[tuple[Image.Image, str]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (int(x) for x in rng.integers(24, 96, size=2))
        out.append((Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)), QUESTIONS[i % 5]))
    return out


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def fit_probe(backend, folder: Path, seed: int) -> None:
    from lvlmlp.probing.probes import LogisticProbe

    rows = make_requests(32, seed + 1)
    X = backend.prefill(backend.encode([r[0] for r in rows], [r[1] for r in rows]))["logits"].numpy()
    LogisticProbe(C=1e4, standardize=True, max_iter=2000).fit(X, np.arange(len(rows)) % 2).save(folder)


def one_at_a_time(backend, guard, requests, max_tokens: int) -> tuple[list[str], list[float], float]:
    import torch

    from lvlmlp.steering.guard import guarded_generate

    texts, latencies = [], []
    start = time.perf_counter()
    for image, question in requests:
        t0 = time.perf_counter()
        batch = backend.encode([image], [question])
        with torch.inference_mode():
            seq = guarded_generate(backend.model, batch, guard, max_new_tokens=max_tokens, do_sample=False,
                                   pad_token_id=backend._pad_id)
        texts.append(backend.tokenizer.decode(seq[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        latencies.append(time.perf_counter() - t0)
    return texts, latencies, time.perf_counter() - start


async def load(url: str, bodies: list[dict], clients: int) -> tuple[list[str], list[float], float]:
    import httpx

    texts: list[str] = [""] * len(bodies)
    latencies: list[float] = [0.0] * len(bodies)
    todo = iter(range(len(bodies)))

    async def client(http: httpx.AsyncClient) -> None:
        for i in todo:  # one shared iterator: each request is sent by exactly one client
            t0 = time.perf_counter()
            response = await http.post(url + "/v1/chat/completions", json=bodies[i])
            response.raise_for_status()
            latencies[i] = time.perf_counter() - t0
            texts[i] = response.json()["choices"][0]["message"]["content"]

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return texts, latencies, time.perf_counter() - start


def start_server(args: argparse.Namespace, probe: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lvlmlp.cli", "serve", "--model", str(args.model), "--probe", str(probe),
           "--template", args.template, "--port", str(port), "--device", args.device, "--max-batch",
           str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms), "--max-queue", str(max(64, args.n)),
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"lvlmlp serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("lvlmlp serve did not start in 300 s")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the demo model")
    parser.add_argument("--probe", default=None, help="default: a probe fitted here on the model's logits")
    parser.add_argument("--template", default="Sorry, I cannot help with that.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=96, help="requests per measurement")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads here and in the server")
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by the server process's torch at start

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from lvlmlp.demo.pipeline import demo_model_path
    from lvlmlp.extraction.backend import Backend
    from lvlmlp.probing.probes import load_probe
    from lvlmlp.steering.guard import ProbeGuard

    args.model = args.model or demo_model_path()
    backend = Backend(args.model, device=args.device)
    tmp = tempfile.TemporaryDirectory()
    probe = Path(args.probe) if args.probe else Path(tmp.name) / "probe"
    if not args.probe:
        fit_probe(backend, probe, args.seed)
    guard = ProbeGuard(load_probe(probe), backend.tokenizer, args.template)
    requests = make_requests(args.n, args.seed)
    print(f"model {args.model}, {args.n} requests, max_tokens {args.max_tokens}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs", flush=True)

    one_at_a_time(backend, guard, requests[:4], args.max_tokens)  # warm-up
    ref, ref_lat, ref_wall = one_at_a_time(backend, guard, requests, args.max_tokens)

    bodies = [{"model": Path(str(args.model)).name, "temperature": 0, "max_tokens": args.max_tokens,
               "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(im)}},
                                                         {"type": "text", "text": q}]}]} for im, q in requests]
    rows = []
    proc, url = start_server(args, probe)  # its own copy of the model, in its own process
    try:
        asyncio.run(load(url, bodies[:4], 1))  # warm-up
        for clients in (int(c) for c in args.clients.split(",")):
            texts, lat, wall = asyncio.run(load(url, bodies, clients))
            rows.append((f"lvlmlp serve, {clients} clients", clients, args.n / wall, lat,
                         0.0, texts == ref))
    finally:
        proc.terminate()
        proc.wait()
    # The baseline once more, after the server: on a shared machine speed drifts, so the ratios use the mean.
    again, again_lat, again_wall = one_at_a_time(backend, guard, requests, args.max_tokens)
    base_rps = args.n / ((ref_wall + again_wall) / 2)
    rows = [("one at a time, no server (before)", 1, args.n / ref_wall, ref_lat, 1.0, True),
            ("one at a time, no server (after)", 1, args.n / again_wall, again_lat, 1.0, again == ref), *rows]
    rows = [(name, c, rps, lat, rps / base_rps, same) for name, c, rps, lat, _, same in rows]

    print("\n| setting | requests/s | p50 latency (s) | p95 latency (s) | vs one at a time (mean of before/after) | same answers |")
    print("|---|---|---|---|---|---|")
    for name, _, rps, lat, ratio, same in rows:
        p50, p95 = np.percentile(lat, [50, 95])
        print(f"| {name} | {rps:.1f} | {p50:.3f} | {p95:.3f} | {ratio:.2f}x | {'yes' if same else 'NO'} |")
    print(json.dumps({"n": args.n, "max_tokens": args.max_tokens, "results": [
        {"setting": name, "rps": round(rps, 2), "p50": round(float(np.percentile(lat, 50)), 4),
         "p95": round(float(np.percentile(lat, 95)), 4), "ratio": round(ratio, 2), "same_answers": same}
        for name, _, rps, lat, ratio, same in rows]}))


if __name__ == "__main__":
    main()
