"""`lvlmlp serve` on a tiny real LLaVA checkpoint and a probe fitted on its first-token logits, through HTTP.

The server runs on 127.0.0.1 on a free port (uvicorn in a thread) and is stopped after the module. Answers are
checked against independent computations: `lvlmlp generate` on the same manifest, each request sent alone, the
probe applied to `Backend.prefill` logits.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from transformers.image_transforms import get_resize_output_image_size

from lvlmlp import open_run
from lvlmlp.cli import build_parser, main
from lvlmlp.commands.serve import build_app
from lvlmlp.data import MAX_PROCESSED_PIXELS, load_image
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.backend import Backend
from lvlmlp.probing.probes import LogisticProbe, load_probe
from lvlmlp.serve import Engine, Limits, ServeConfig, create_app, load_engine
from lvlmlp.steering.guard import SAFETY_TEMPLATE, ProbeGuard

TEMPLATE = "I cannot answer."
KEY = "sk-test-key"
K = 10  # tokens per answer: more than the template's 7, so flagged answers continue after it
LABELS = [1, 0, 1, 0]  # the probe reproduces them: rows 1 and 3 are flagged


def _png(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def data_url(image: Image.Image, fmt: str = "PNG", media_type: str = "image/png") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:{media_type};base64,{base64.b64encode(buf.getvalue()).decode()}"


def message(url: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def world(tiny_ckpt, tmp_path_factory):
    """The checkpoint, 4 manifest rows (images on disk), the probe folder and the probe's scores of the rows."""
    root = tmp_path_factory.mktemp("serve")
    ckpt = tiny_ckpt("llava")
    words = ["what", "is", "the", "color", "of", "this", "shape", "in", "the", "image"]
    rows = []
    for i in range(4):
        _png(i, (20 + 9 * i, 50 - 7 * i)).save(root / f"{i}.png")
        rows.append({"id": f"r{i}", "image": str(root / f"{i}.png"), "question": " ".join(words[: 2 + 3 * i]) + " ?",
                     "label": LABELS[i]})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    backend = Backend(ckpt, device="cpu")
    X = backend.prefill(backend.encode([load_image(r["image"]) for r in rows], [r["question"] for r in rows]))
    X = X["logits"].numpy()
    probe = LogisticProbe(C=1e4, standardize=True, max_iter=2000).fit(X, np.array(LABELS))
    scores = probe.predict_proba(X)[:, 1]
    assert (scores < 0.5).tolist() == [False, True, False, True]
    probe.save(root / "probe")
    return {"root": root, "ckpt": ckpt, "rows": rows, "probe": root / "probe", "scores": scores, "backend": backend}


@contextmanager
def running(app) -> Iterator[str]:
    """uvicorn on 127.0.0.1, on a port the OS picks (bound here: no race for it), stopped on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


LIMITS = Limits(max_image_bytes=40_000, max_image_pixels=300 * 300, max_prompt_chars=500)


@pytest.fixture(scope="module")
def server(world):
    engine = load_engine(world["ckpt"], world["probe"], template=TEMPLATE, device="cpu")
    config = ServeConfig(model_id="tiny-llava", aliases={str(world["ckpt"])}, limits=LIMITS, max_body_bytes=100_000,
                         default_max_tokens=K, max_tokens_limit=64, api_key=KEY, max_batch=8, batch_wait_ms=30,
                         max_queue=64)
    app = create_app(engine, config)
    with running(app) as url:
        yield {"url": url, "app": app}


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def ask(client, row: dict, **kwargs):
    return client.chat.completions.create(model="tiny-llava", messages=message(data_url(load_image(row["image"])),
                                                                                 row["question"]), **kwargs)


def test_openai_client_flagged_and_unflagged_equal_lvlmlp_generate(world, client, server, tmp_path):
    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", str(world["ckpt"]), "--data", str(world["root"] / "data.jsonl"),
                 "--probe", str(world["probe"]), "--template", TEMPLATE, "--out", str(out), "--device", "cpu",
                 "--max-new-tokens", str(K), "--no-progress"]) == 0
    generated = [json.loads(line) for line in out.read_text().splitlines()]
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-llava"]
    for i in (0, 1):  # unflagged, flagged
        response = ask(client, world["rows"][i], temperature=0, max_tokens=K)
        choice = response.choices[0]
        assert choice.flagged is (i == 1) and choice.flagged == generated[i]["flagged"]
        assert choice.probe_score == pytest.approx(world["scores"][i], abs=1e-5)
        assert choice.message.content == generated[i]["response"]
        assert response.model == "tiny-llava" and response.usage.completion_tokens >= 1
    assert choice.message.content.startswith(TEMPLATE)
    # The checkpoint's path names the same model.
    again = client.chat.completions.create(model=str(world["ckpt"]), temperature=0, max_tokens=K,
                                           messages=message(data_url(load_image(world["rows"][1]["image"])),
                                                            world["rows"][1]["question"]))
    assert again.choices[0].message.content == generated[1]["response"]


def test_streaming_gives_the_non_streaming_text(world, client):
    for i in (0, 1):
        plain = ask(client, world["rows"][i], temperature=0, max_tokens=K).choices[0]
        chunks = list(ask(client, world["rows"][i], temperature=0, max_tokens=K, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert text == plain.message.content
        assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason == plain.finish_reason
        assert all(c.choices[0].flagged is plain.flagged for c in chunks)
        assert all(c.choices[0].probe_score == pytest.approx(plain.probe_score, abs=1e-6) for c in chunks)


def _requests(world) -> list[dict]:
    """32 requests: 8 images x 4 settings (greedy with varied max_tokens, seeded sampling with varied settings);
    images 0 and 1 are the probe's rows 0 (not flagged) and 1 (flagged)."""
    out = []
    for i in range(32):
        image = _png(100 + i % 8, (24 + 3 * (i % 8), 40 - 2 * (i % 8)))
        question = " ".join(["what", "is", "in", "the", "image", "?"][: 2 + i % 5])
        if i % 8 < 2:
            image, question = load_image(world["rows"][i % 8]["image"]), world["rows"][i % 8]["question"]
        kind = i // 8
        settings = [{"temperature": 0, "max_tokens": K}, {"temperature": 0, "max_tokens": 3 + i % 4},
                    {"temperature": 0.8, "seed": i}, {"temperature": 1.3, "top_p": 0.7, "seed": 1000 + i}][kind]
        out.append({"messages": message(data_url(image), question), **settings})
    return out


def _metric(url: str, name: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {(s.name + json.dumps(s.labels, sort_keys=True)): s.value
            for family in text_string_to_metric_families(text) if family.name == name for s in family.samples}


def test_32_concurrent_requests_each_equal_their_answer_alone(world, client, server):
    requests = _requests(world)
    start = _metric(server["url"], "lvlmlp_serve_batch_size")
    alone = [client.chat.completions.create(model="tiny-llava", **r).choices[0] for r in requests]
    before = _metric(server["url"], "lvlmlp_serve_batch_size")

    async def together():
        async with openai.AsyncOpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0,
                                      timeout=120) as aclient:
            return await asyncio.gather(*(aclient.chat.completions.create(model="tiny-llava", **r)
                                          for r in requests))

    batched = [r.choices[0] for r in asyncio.run(together())]
    for i, (a, b) in enumerate(zip(alone, batched)):
        assert b.message.content == a.message.content, i
        assert (b.flagged, b.finish_reason) == (a.flagged, a.finish_reason), i
        assert b.probe_score == pytest.approx(a.probe_score, abs=1e-5), i
    assert {a.flagged for a in alone} == {True, False}  # both verdicts are among them
    # Sampling really sampled (the greedy answer of the same image differs), and max_tokens cut answers short.
    assert any(alone[16 + j].message.content != alone[j].message.content for j in range(8))
    assert any(a.finish_reason == "length" and len(a.message.content) < len(alone[j].message.content)
               for j, a in enumerate(alone[8:16]))
    after = _metric(server["url"], "lvlmlp_serve_batch_size")
    count = 'lvlmlp_serve_batch_size_count{}'
    ones = 'lvlmlp_serve_batch_size_bucket{"le": "1.0"}'
    assert before[count] - start[count] == before[ones] - start[ones] == 32  # alone: 32 batches of one ...
    assert after[count] - before[count] < 32  # ... together: fewer batches, so some larger than one
    assert after["lvlmlp_serve_batch_size_sum{}"] - before["lvlmlp_serve_batch_size_sum{}"] == 32
    n_requests = _metric(server["url"], "lvlmlp_serve_requests")['lvlmlp_serve_requests_total{"code": "200"}']
    assert n_requests >= 64


def _post(url: str, body: object, key: str | None = KEY, raw: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    if raw is not None:
        return httpx.post(url + "/v1/chat/completions", content=raw,
                          headers={**headers, "Content-Type": "application/json"}, timeout=60)
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)


def test_bad_requests_get_their_status_and_message(world, server, client):
    url = server["url"]
    good = data_url(load_image(world["rows"][0]["image"]))
    q = "what is the image ?"

    def body(**kw):
        return {"model": "tiny-llava", "messages": message(good, q), **kw}

    svg = "data:image/svg+xml;base64," + base64.b64encode(b"<svg xmlns='http://www.w3.org/2000/svg'/>").decode()
    huge = Image.new("RGB", (400, 400), "red")  # a few hundred bytes, but more pixels than --max-image-pixels
    cases = [
        (body(messages=[{"role": "user", "content": q}]), 400, "no image"),
        (body(messages=message("data:image/png;base64,iVBORw0K$$$not-base64", q)), 400, "broken base64"),
        (body(messages=message(svg, q)), 415, "unsupported image type 'image/svg+xml'"),
        (body(messages=message("data:image/png;base64," + base64.b64encode(b"GIF89a? no").decode(), q)), 400,
         "not a readable image/png image"),
        (body(messages=message("https://example.com/cat.png", q)), 400, "remote image URLs are never fetched"),
        (body(messages=message(world["rows"][0]["image"], q)), 400, "--allow-local-images"),
        (body(messages=message(data_url(huge, "JPEG", "image/jpeg"), q)), 413, "400x400 pixels"),
        (body(messages=message(good, "why " * 200)), 400, "at most 500 (--max-prompt-chars)"),
        (body(max_tokens=65), 400, "max_tokens 65 is above this server's limit 64"),
        (body(n=2), 400, "n: this server returns one choice per request"),
        (body(temperature=3), 400, "temperature: Input should be less than or equal to 2"),
        (body(model="gpt-4o"), 404, "model 'gpt-4o' is not served here"),
        (body(messages=[{"role": "system", "content": "be nice"}, *message(good, q)]), 400, "one user message"),
        (body(messages=message(good, q) + message(good, q)), 400, "one user message"),
    ]
    for payload, status, text in cases:
        response = _post(url, payload)
        assert response.status_code == status, (text, response.text)
        assert text in response.json()["error"]["message"], (text, response.text)
    # An image over --max-image-bytes inside a body under --max-body-bytes, and a body over it.
    noise = data_url(_png(8, (140, 140)))
    assert len(noise) * 3 // 4 > 40_000 and len(noise) < 99_000
    response = _post(url, body(messages=message(noise, q)))
    assert response.status_code == 413 and "--max-image-bytes" in response.json()["error"]["message"]
    response = _post(url, None, raw=json.dumps(body(messages=message(noise + noise[30:], q))).encode())
    assert response.status_code == 413 and "--max-body-bytes" in response.json()["error"]["message"]
    response = _post(url, None, raw=b'{"model": "tiny-llava", "messages": [')
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    # API key: none, wrong (through the official client too), and /v1/models guarded as well.
    for key in (None, "sk-wrong"):
        response = _post(url, body(), key=key)
        assert response.status_code == 401 and "API key" in response.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError, match="wrong API key"):
        openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="broken base64"):
        client.chat.completions.create(model="tiny-llava", messages=message("data:image/png;base64,@@", q))
    # The server is still up and answers.
    assert httpx.get(url + "/health").json()["status"] == "ok"
    assert ask(client, world["rows"][0], temperature=0, max_tokens=2).choices[0].message.content
    codes = _metric(url, "lvlmlp_serve_requests")
    for code in ("400", "401", "404", "413", "415"):
        assert codes[f'lvlmlp_serve_requests_total{{"code": "{code}"}}'] >= 1, code


class GatedEngine(Engine):
    """The real engine, made to wait for the test before each batch: the queue fills deterministically."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.gate, self.entered = threading.Event(), threading.Event()

    def run(self, jobs):
        self.entered.set()
        assert self.gate.wait(60)
        return super().run(jobs)


def test_full_queue_answers_503_and_recovers(world):
    backend = world["backend"]
    engine = GatedEngine(backend, ProbeGuard(load_probe(world["probe"]), backend.tokenizer, TEMPLATE))
    app = create_app(engine, ServeConfig(model_id="m", max_batch=1, max_queue=1, batch_wait_ms=0, default_max_tokens=3,
                                         limits=Limits(allow_local_images=True)))
    payload = {"model": "m", "messages": message(data_url(load_image(world["rows"][0]["image"])), "what ?")}
    with running(app) as url, ThreadPoolExecutor(2) as pool:
        first = pool.submit(_post, url, payload, None)
        assert engine.entered.wait(60)  # the worker holds the first request ...
        second = pool.submit(_post, url, payload, None)
        deadline = time.monotonic() + 60
        while httpx.get(url + "/health").json()["queue"] < 1:  # ... and the second one fills the queue
            assert time.monotonic() < deadline
            time.sleep(0.01)
        third = _post(url, payload, None)
        assert third.status_code == 503 and third.headers["Retry-After"] == "1"
        assert "the request queue is full (1 waiting)" in third.json()["error"]["message"]
        engine.gate.set()
        assert first.result().status_code == second.result().status_code == 200
        assert first.result().json()["choices"][0]["message"] == second.result().json()["choices"][0]["message"]
        # --allow-local-images: a path or a file:// URL reads the same image as the data URL.
        for local in (world["rows"][0]["image"], "file://" + world["rows"][0]["image"]):
            response = _post(url, {"model": "m", "messages": message(local, "what ?")}, None)
            assert response.json()["choices"][0]["message"] == first.result().json()["choices"][0]["message"]
        response = _post(url, {"model": "m", "messages": message("/no/such.png", "what ?")}, None)
        assert response.status_code == 400 and "image not found: /no/such.png" in response.json()["error"]["message"]


def test_cli_serve_flags_build_the_app(world, server, monkeypatch):
    """The command's flags: the served id and the model's path as an alias, LVLMLP_API_KEY, the limits; the app
    it builds (served here as uvicorn.run would) gives the fixture server's answer."""
    assert main(["serve", "--model", str(world["ckpt"]), "--probe", str(world["probe"]), "--template", "x",
                 "--answers", "yes,no"]) == 2  # both modes
    assert main(["serve", "--model", str(world["ckpt"]), "--probe", str(world["probe"]), "--template", "x",
                 "--max-batch", "0"]) == 2
    assert main(["serve", "--model", str(world["ckpt"]), "--probe", str(world["probe"]), "--template", TEMPLATE,
                 "--device", "cpu", "--max-tokens", "2"]) == 2  # the template would be cut by the default
    monkeypatch.setenv("LVLMLP_API_KEY", "sk-env")
    args = build_parser().parse_args(["serve", "--model", str(world["ckpt"]), "--probe", str(world["probe"]),
                                      "--template", TEMPLATE, "--device", "cpu", "--max-image-bytes", "1000"])
    app = build_app(args)
    assert app.state.config.limits.max_image_bytes == 1000
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-env", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [world["ckpt"].name]
        row = world["rows"][1]
        small = Image.open(row["image"]).resize((8, 8))  # under --max-image-bytes
        kwargs = dict(temperature=0, max_tokens=K, messages=message(data_url(small), row["question"]))
        mine = client.chat.completions.create(model=str(world["ckpt"]), **kwargs).choices[0]
        theirs = openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0)
        expected = theirs.chat.completions.create(model="tiny-llava", **kwargs).choices[0]
        assert (mine.message.content, mine.flagged) == (expected.message.content, expected.flagged)
        with pytest.raises(openai.APIStatusError, match="--max-image-bytes"):
            client.chat.completions.create(model=world["ckpt"].name, messages=message(
                data_url(load_image(row["image"])), row["question"]))


def test_serve_defaults_to_the_original_safety_template(world):
    """Without --template or --answers the guard forces the original's MM-SafetyBench text; an explicit --template
    wins; the default --max-tokens (64) grows to a longer forced text instead of refusing to start."""
    base = ["serve", "--model", str(world["ckpt"]), "--probe", str(world["probe"]), "--device", "cpu"]

    def built(*flags: str) -> tuple[ProbeGuard, int]:
        app = build_app(build_parser().parse_args([*base, *flags]))
        return app.state.batcher.engine.guard, app.state.config.default_max_tokens

    guard, max_tokens = built()
    assert guard.template == SAFETY_TEMPLATE and guard.answer_ids is None and max_tokens == 64
    assert world["backend"].tokenizer.decode(guard.template_ids) == SAFETY_TEMPLATE
    long = " ".join(["I cannot answer."] * 12)  # over 64 tokens in the tiny tokenizer
    guard, max_tokens = built("--template", long)
    assert guard.template == long and max_tokens == len(guard.template_ids) > 64
    with pytest.raises(LvlmlpError, match=r"--template is \d+ tokens long but --max-tokens is 64"):
        built("--template", long, "--max-tokens", "64")


def test_serve_refuses_at_start_a_probe_of_another_model(world, tmp_path):
    """The probe/model check runs when the engine loads (not at the first request): a copy of the checkpoint at
    another path is another model to it, refused naming both; --allow-other-model serves it."""
    import shutil

    from lvlmlp.probing.features import FeatureSpec

    probe = load_probe(world["probe"])  # the same probe, saved with the model whose features it was trained on
    probe.spec_ = FeatureSpec(kind="logits", token=0, dim=world["backend"].vocab_size, model=str(world["ckpt"]))
    probe.save(tmp_path / "probe")
    other = tmp_path / "other-ckpt"
    shutil.copytree(world["ckpt"], other)
    with pytest.raises(LvlmlpError, match=r"--probe: trained on features of .*, not of --model .*other-ckpt"):
        load_engine(other, tmp_path / "probe", template=TEMPLATE, device="cpu")
    assert load_engine(world["ckpt"], tmp_path / "probe", template=TEMPLATE, device="cpu").guard.template == TEMPLATE
    engine = load_engine(other, tmp_path / "probe", template=TEMPLATE, device="cpu", allow_other_model=True)
    assert engine.guard.template == TEMPLATE


# ------------------------------------------------------------------------------------------- family quirks in serve
def _family_world(tiny_ckpt, root, family: str, sizes: list[tuple[int, int]], questions: list[str]) -> dict:
    """A family's checkpoint folder, one manifest row per (image size, question), and a probe fitted on its
    first-token logits that flags rows 1 and 3 (LABELS)."""
    import shutil

    ckpt = root / family
    shutil.copytree(tiny_ckpt(family), ckpt)
    rows = []
    for i, (size, question) in enumerate(zip(sizes, questions)):
        _png(50 + i, size).save(root / f"{family}{i}.png")
        rows.append({"id": f"r{i}", "image": str(root / f"{family}{i}.png"), "question": question,
                     "label": LABELS[i]})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"ckpt": ckpt, "rows": rows, "root": root}


def _fit_probe(backend: Backend, world: dict) -> np.ndarray:
    rows = world["rows"]
    X = backend.prefill(backend.encode([load_image(r["image"]) for r in rows], [r["question"] for r in rows]))
    X = X["logits"].numpy()
    probe = LogisticProbe(C=1e4, standardize=True, max_iter=2000).fit(X, np.array(LABELS))
    scores = probe.predict_proba(X)[:, 1]
    assert (scores < 0.5).tolist() == [False, True, False, True]
    probe.save(world["root"] / "probe")
    return scores


def test_serving_janus_flags_and_forces_the_template_as_lvlmlp_generate_does(tiny_ckpt, tmp_path):
    """Janus's own `generate` drops logits processors (the guard would be silently skipped, which the guard's
    watch turns into an error); serve decodes through the backend's `model_generate`, which calls the generic one
    (`Quirks.generic_generate`): over HTTP, in one batch of 4, each answer, flag and score equal `lvlmlp generate`."""
    questions = ["what is it ?", "what color is the shape in the image ?", "is it red ?", "how many shapes ?"]
    world = _family_world(tiny_ckpt, tmp_path, "janus", [(20 + 9 * i, 50 - 7 * i) for i in range(4)], questions)
    backend = Backend(world["ckpt"], device="cpu")
    scores = _fit_probe(backend, world)
    engine = load_engine(world["ckpt"], tmp_path / "probe", template=TEMPLATE, device="cpu")
    k = len(engine.guard.template_ids) + 3  # flagged answers continue after the template
    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--model", str(world["ckpt"]), "--data", str(tmp_path / "data.jsonl"), "--probe",
                 str(tmp_path / "probe"), "--template", TEMPLATE, "--out", str(out), "--device", "cpu",
                 "--max-new-tokens", str(k), "--no-progress"]) == 0
    generated = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["flagged"] for g in generated] == [False, True, False, True]
    app = create_app(engine, ServeConfig(model_id="janus", default_max_tokens=k, max_batch=4, batch_wait_ms=2000))
    payloads = [{"model": "janus", "temperature": 0, "messages": message(data_url(load_image(r["image"])),
                                                                         r["question"])} for r in world["rows"]]
    with running(app) as url, ThreadPoolExecutor(4) as pool:
        answers = [r.json()["choices"][0] for r in pool.map(lambda p: _post(url, p, None), payloads)]
        sizes = _metric(url, "lvlmlp_serve_batch_size")
    assert sizes["lvlmlp_serve_batch_size_count{}"] < 4  # some requests shared a batch
    for answer, expected, score in zip(answers, generated, scores):
        assert (answer["message"]["content"], answer["flagged"]) == (expected["response"], expected["flagged"])
        assert answer["probe_score"] == pytest.approx(score, abs=1e-5)
    assert answers[1]["message"]["content"].startswith(TEMPLATE)
    assert answers[3]["message"]["content"].startswith(TEMPLATE)


def test_serving_a_llama4_batch_past_its_padded_limit_runs_its_requests_alone(tiny_ckpt, tmp_path, caplog):
    """Llama 4 (`Quirks.padded_limit`): a padded batch reaching `floor_scale - 1` is refused by the backend with one
    line (padded rows differ there); serve gets such a batch whenever requests of other prompt lengths meet, so its
    engine runs them one at a time: each answer, flag and score equal the request decoded alone through the backend
    (`guarded_responses` on an unpadded batch of one). The checkpoint's floor_scale is 8, as in the backend's test."""
    import logging

    from lvlmlp.serve import Job
    from lvlmlp.steering.guard import guarded_responses

    questions = ["what is it ?", "what color is the shape in the image ?", "is it red ?", "how many shapes ?"]
    world = _family_world(tiny_ckpt, tmp_path, "llama4", [(30, 30)] * 4, questions)
    config = json.loads((world["ckpt"] / "config.json").read_text())
    config["text_config"]["floor_scale"] = 8
    (world["ckpt"] / "config.json").write_text(json.dumps(config))
    backend = Backend(world["ckpt"], device="cpu")
    rows = world["rows"]
    # The probe is fitted on single rows: a padded prefill this long is refused too.
    single = [backend.prefill(backend.encode([load_image(r["image"])], [r["question"]]))["logits"][0] for r in rows]
    X = np.stack([x.numpy() for x in single])
    probe = LogisticProbe(C=1e4, standardize=True, max_iter=2000).fit(X, np.array(LABELS))
    assert (probe.predict_proba(X)[:, 1] < 0.5).tolist() == [False, True, False, True]
    probe.save(tmp_path / "probe")
    engine = load_engine(world["ckpt"], tmp_path / "probe", template=TEMPLATE, device="cpu")
    k = len(engine.guard.template_ids) + 2
    images = [load_image(r["image"]) for r in rows]
    batch = backend.encode(images, questions)
    assert (batch["attention_mask"] == 0).any() and batch["input_ids"].shape[1] > 8
    want = (f"{world['ckpt']}: a padded llama4 batch reaches position {batch['input_ids'].shape[1] + k - 2}, from 7 "
            "on padded rows differ from single runs (floor_scale, see docs/models.md); use --batch-size 1")
    with pytest.raises(LvlmlpError) as err:  # what `lvlmlp generate` says of this batch
        engine.backend.model_generate(batch, max_new_tokens=k, do_sample=False)
    assert str(err.value) == want
    jobs = [Job(image=im, question=q, max_tokens=k) for im, q in zip(images, questions)]
    with caplog.at_level(logging.INFO, logger="lvlmlp"):
        results = engine.run(jobs)
    assert "a padded batch of 4 requests would reach the model's padded limit" in caplog.text
    guard = ProbeGuard(load_probe(tmp_path / "probe"), backend.tokenizer, TEMPLATE)
    for r, (image, question, result) in enumerate(zip(images, questions, results)):
        alone = guarded_responses(backend, backend.encode([image], [question]), guard, max_new_tokens=k)
        assert result.text == alone["responses"][0], r
        assert result.flagged is bool(guard.flagged_[0]) and result.probe_score == pytest.approx(guard.scores_[0], rel=1e-4)
        assert result.completion_tokens == int(alone["n_tokens"][0])
    assert [res.flagged for res in results] == [False, True, False, True]
    assert results[1].text.startswith(TEMPLATE)
    # A batch without padding (the same request twice) is exact past the limit: it runs as one batch.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lvlmlp"):
        twice = engine.run(jobs[1:2] * 2)
    assert "padded limit" not in caplog.text
    assert [res.text for res in twice] == [results[1].text] * 2

# ---------------------------------------------------------------------------------- image intake and bad requests
# An image whose processed size would take gigabytes is refused from its header, before any pixel is decoded
# (server and extraction alike), and every malformed request is a 4xx naming its part.
#
# Peak memory is read from the kernel (VmHWM of this process, reset through /proc/self/clear_refs): the server runs in
# a thread of this process, the extraction with `--workers 0`. The tiny LLaVA's processor scales the shorter side to
# 28 pixels, so a 200000x1 PNG (a few hundred bytes) would become 28x5600000 pixels: gigabytes of float32.


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident size


def _peak_growth_mb(before: int) -> float:
    return (_vm("VmHWM") - before) / 1024


def _vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])  # kB
    raise AssertionError(key)


def _png_bytes(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def open_server(world):
    """The server with its default limits (4096x4096 pixels), no API key."""
    engine = load_engine(world["ckpt"], world["probe"], template="I cannot answer.", device="cpu")
    with running(create_app(engine, ServeConfig(model_id="m", default_max_tokens=2))) as url:
        yield url


def test_a_200000x1_png_is_refused_from_its_header_with_bounded_memory(world, open_server):
    png = _png_bytes((200_000, 1))
    assert len(png) < 2000 and 200_000 < MAX_PROCESSED_PIXELS  # small, and under --max-image-pixels as decoded
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    _reset_peak()
    before = _vm("VmRSS")
    response = _post(open_server, {"model": "m", "messages": message(url, "what is it ?")}, key=None)
    growth = _peak_growth_mb(before)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["message"] == (
        "messages[0].content[0].image_url: the image is 200000x1 pixels, which the model's processor would resize "
        f"to about {28 * 5_600_000} pixels; at most {MAX_PROCESSED_PIXELS} (--max-image-pixels): crop or pad an "
        "image of such an aspect ratio")
    assert growth < 100, f"the request took {growth:.0f} MB"  # the processor alone would take gigabytes
    # The estimate is the processor's resize: transformers' own rule makes a 2x100 image 28x1400 (shortest edge 28).
    backend = world["backend"]
    assert backend.processor.image_processor.size.shortest_edge == 28
    rule = get_resize_output_image_size(np.zeros((100, 2, 3), np.uint8), size=28, default_to_square=False,
                                        input_data_format="channels_last")
    assert backend.processed_pixels(2, 100) == rule[0] * rule[1] == 28 * 1400
    # An image of an ordinary shape is answered.
    ok = _post(open_server, {"model": "m", "messages": message(data_url(Image.new("RGB", (300, 40))), "what ?")}, key=None)
    assert ok.status_code == 200, ok.text


def test_bad_numbers_nesting_and_base64_are_4xx_naming_the_field(world, open_server):
    good = data_url(load_image(world["rows"][0]["image"]))

    def body(**kw):
        return {"model": "m", "messages": message(good, "what ?"), **kw}

    cases = [
        (body(seed=2**70, temperature=1), "seed: Input should be less than or equal to 18446744073709551615"),
        (body(seed=-(2**70)), "seed: Input should be greater than or equal to -9223372036854775808"),
        (body(max_tokens=2**70), f"max_tokens {2**70} is above this server's limit"),
        (body(temperature=2**70), "temperature: Input should be less than or equal to 2"),
        (body(messages=message("data:image/png;base64,abcde", "what ?")), "broken base64"),
        (body(messages=message("data:image/png;base64," + "A" * 5, "what ?")), "broken base64"),
    ]
    for payload, text in cases:
        response = _post(open_server, payload, key=None)
        assert response.status_code == 400 and text in response.json()["error"]["message"], (text, response.text)
    raw = [
        (json.dumps(body()).replace('"model"', '"temperature": NaN, "model"'), "temperature: "),
        (json.dumps(body()).replace('"model"', '"top_p": Infinity, "model"'), "top_p: "),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        (json.dumps(body()).replace("what ?", "what \\ud800?"), "the question is not valid Unicode"),
        ('{"model": "m", "messages": ' + "[" * 50_000 + "]" * 50_000 + "}", "nested too deeply"),
    ]
    for text_body, text in raw:
        response = _post(open_server, None, key=None, raw=text_body.encode())
        assert response.status_code == 400 and text in response.json()["error"]["message"], (text, response.text)
        assert "\n" not in response.json()["error"]["message"]
    # A PNG whose header declares a zero-width image: PIL refuses it on opening (a 400, not a 500).
    png = bytearray(_png_bytes((4, 4)))
    png[16:20] = (0).to_bytes(4, "big")  # IHDR width
    response = _post(open_server, body(messages=message("data:image/png;base64," + base64.b64encode(png).decode(),
                                                   "what ?")), key=None)
    assert response.status_code == 400, response.text
    assert "not a readable image/png image" in response.json()["error"]["message"]


def test_extraction_refuses_or_skips_a_100000x1_png_without_decoding_it(world, tmp_path, capsys):
    (tmp_path / "thin.png").write_bytes(_png_bytes((100_000, 1)))
    Image.new("RGB", (30, 20), "red").save(tmp_path / "ok.png")
    rows = [{"id": "ok", "image": "ok.png", "question": "what is it ?"},
            {"id": "thin", "image": "thin.png", "question": "what is it ?"}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["extract", "--model", str(world["ckpt"]), "--data", str(tmp_path / "data.jsonl"), "--device", "cpu",
            "--no-progress", "--workers", "0"]
    capsys.readouterr()
    _reset_peak()
    before = _vm("VmRSS")
    assert main([*base, "--out", str(tmp_path / "fail")]) == 2
    growth = _peak_growth_mb(before)
    err = capsys.readouterr().err.strip()
    assert err == (f"lvlmlp: error: {tmp_path / 'data.jsonl'}: row 'thin': {tmp_path / 'thin.png'}: the image is "
                   f"100000x1 pixels, which the model's processor would resize to about {28 * 2_800_000} pixels "
                   f"(aspect ratio 100000:1), more than {MAX_PROCESSED_PIXELS}; crop or pad it"), err
    assert growth < 200, f"the extraction took {growth:.0f} MB"
    assert main([*base, "--out", str(tmp_path / "skip"), "--on-error", "skip"]) == 0
    run = open_run(tmp_path / "skip")
    assert run.ids == ["ok"] and [f["id"] for f in run.failures] == ["thin"]
    # load_image's check sees the header's size before decoding; without a check the image loads as it is.
    with pytest.raises(LvlmlpError, match="row 'thin': .*: too wide"):
        load_image(tmp_path / "thin.png", "thin", check=lambda w, h: "too wide" if w > 10 * h else None)
    assert load_image(tmp_path / "ok.png", "ok", check=Backend.oversized.__get__(world["backend"])).size == (30, 20)


def test_clip_features_refuse_or_skip_a_100000x1_png_too(tmp_path):
    """The CLIP baseline's processor scales the shorter side as well (32 pixels in the tiny CLIP): the same check."""
    from lvlmlp.extraction.clip_features import extract_clip, tiny_clip

    (tmp_path / "thin.png").write_bytes(_png_bytes((100_000, 1)))
    Image.new("RGB", (30, 20), "red").save(tmp_path / "ok.png")
    rows = [{"id": "ok", "image": str(tmp_path / "ok.png"), "question": "what is it ?"},
            {"id": "thin", "image": str(tmp_path / "thin.png"), "question": "what is it ?"}]
    model = tiny_clip(tmp_path / "clip")
    _reset_peak()
    before = _vm("VmRSS")
    with pytest.raises(LvlmlpError, match=r"clip: row 'thin': .*thin.png: the image is 100000x1 pixels, which the "
                                          rf"model's processor would resize to about {32 * 3_200_000} pixels"):
        extract_clip(model, rows, {"image": tmp_path / "fail"}, device="cpu", progress=False)
    assert _peak_growth_mb(before) < 200
    runs = extract_clip(model, rows, {"image": tmp_path / "skip"}, device="cpu", on_error="skip", progress=False)
    assert runs["image"].ids == ["ok"] and [f["id"] for f in runs["image"].failures] == ["thin"]


def test_a_backend_without_its_own_check_refuses_images_over_the_pixel_bound():
    """A `--backend` class need not say what its processor makes of an image: the decoded size is bounded then."""
    from lvlmlp.data import MAX_PROCESSED_PIXELS, image_check, too_many_pixels

    class Plain:  # a protocol backend (docs/backends.md) without `oversized`
        pass

    assert image_check(Plain()) is too_many_pixels
    assert too_many_pixels(4096, 4096) is None and MAX_PROCESSED_PIXELS == 4096 * 4096
    assert too_many_pixels(100000, 200) == "100000x200 pixels: over the 16,777,216 an image may have"

    class Own:
        def oversized(self, width: int, height: int) -> str | None:
            return "mine"

    own = Own()
    assert image_check(own)(1, 1) == "mine"
