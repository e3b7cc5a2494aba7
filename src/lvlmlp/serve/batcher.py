"""Batched, guarded generation for the server: one worker thread runs the model on batches of queued requests.

`Engine.run(jobs)` decodes one batch through `ProbeGuard` exactly as `lvlmlp generate` does (`guard.watching(model)`,
the guard first in the logits processors, so it scores the raw first-token logits and forces the template), through
the backend's `model_generate`, which applies the family's quirks (Janus's generic generate; a padded batch past Llama
4's limit would stop, so its requests run one at a time instead). Each request keeps its own sampling settings inside
a shared batch:

* `RowSampler` (a `LogitsProcessor` after the guard) samples each sampled row with the request's temperature, top-p
  and its own seeded `torch.Generator`, and leaves greedy rows (temperature 0) to `generate`'s argmax. A row's draws
  thus depend on its seed only, never on which requests share its batch: every request, greedy or sampled, gets the
  answer it would get alone, so all requests are compatible and any of them can be batched together.
* `RowLimit` ends each row at its own `max_tokens`; generation stops when every row has ended.
* `RowStreamer` (a transformers streamer) collects each row's tokens, ends a row at its first EOS exactly as
  `Backend.generate` does, and hands streaming requests their text as it grows.

`Batcher` owns the bounded queue and the worker thread: it takes the first waiting request, collects more until
`max_batch` are there or `batch_wait_ms` have passed, and runs them as one batch.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.logits_process import TopPLogitsWarper
from transformers.generation.streamers import BaseStreamer

from lvlmlp.steering.guard import ProbeGuard

log = logging.getLogger("lvlmlp")


@dataclass
class Job:
    """One request's work: inputs, sampling settings, and where its text goes."""

    image: Image.Image
    question: str
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    # Streaming: called in the worker thread with each new piece of text and the probe's verdict (flagged, score).
    on_text: Callable[[str, bool, float], None] | None = None
    done: Callable[[Result | BaseException], None] = lambda _: None  # called once, in the worker thread
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class Result:
    text: str
    flagged: bool
    probe_score: float
    finish_reason: str  # "stop" (EOS) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int


class RowSampler(LogitsProcessor):
    """Per-row sampling with per-row generators; greedy rows pass through (see the module docstring).

    A sampled row's scores become -inf except 0 at the drawn token, which `generate`'s argmax then picks. Rows the
    guard forces hold one finite value already, so the draw returns the forced token.
    """

    def __init__(self, jobs: list[Job], device: torch.device) -> None:
        self.rows: list[tuple[int, float, TopPLogitsWarper | None, torch.Generator]] = []
        for r, job in enumerate(jobs):
            if job.temperature > 0:
                seed = job.seed if job.seed is not None else secrets.randbits(63)
                gen = torch.Generator(device=device).manual_seed(seed)
                top_p = TopPLogitsWarper(job.top_p) if job.top_p < 1.0 else None
                self.rows.append((r, job.temperature, top_p, gen))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.rows:
            return scores
        out = scores.clone()  # never in place: the guard's output may be generate's raw logits tensor
        for r, temperature, top_p, gen in self.rows:
            row = scores[r : r + 1].float() / temperature
            if top_p is not None:
                row = top_p(input_ids[r : r + 1], row)
            token = torch.multinomial(torch.softmax(row, dim=-1), 1, generator=gen)[0, 0]
            out[r] = -float("inf")
            out[r, token] = 0.0
        return out  # type: ignore[return-value]


class RowLimit(StoppingCriteria):
    """Row r is done after `limits[r]` generated tokens (its request's max_tokens)."""

    def __init__(self, limits: list[int]) -> None:
        self.limits = torch.tensor(limits)
        self._first_len: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        if self._first_len is None:  # called first after the first generated token
            self._first_len = input_ids.shape[1]
        generated = input_ids.shape[1] - self._first_len + 1
        return (self.limits.to(input_ids.device) <= generated)  # type: ignore[return-value]


class RowStreamer(BaseStreamer):
    """Each row's generated tokens up to and including its first EOS, capped at its max_tokens.

    Streaming rows get their text piece by piece: only the part before the last whitespace is sent while the row
    runs (a word, or a multi-byte character, may still change), the rest when the row ends; the pieces add up to
    `text(r)`, the same string a non-streaming request gets.
    """

    def __init__(self, tokenizer: Any, eos_ids: set[int], jobs: list[Job], guard: ProbeGuard) -> None:
        self.tokenizer, self.eos_ids, self.jobs, self.guard = tokenizer, eos_ids, jobs, guard
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.finish: list[str | None] = [None] * len(jobs)
        self.sent = [""] * len(jobs)

    def put(self, value: torch.Tensor) -> None:
        if value.dim() != 1:  # generate first puts the prompt, (B, L); then one (B,) tensor per step
            return
        for r, token in enumerate(value.tolist()):
            if self.finish[r] is not None:
                continue
            self.tokens[r].append(int(token))
            if int(token) in self.eos_ids:
                self.finish[r] = "stop"
            elif len(self.tokens[r]) >= self.jobs[r].max_tokens:
                self.finish[r] = "length"
            self._send(r, final=self.finish[r] is not None)

    def end(self) -> None:
        for r in range(len(self.jobs)):
            if self.finish[r] is None:  # generation ended before this row did (cannot happen; kept safe)
                self.finish[r] = "length"
                self._send(r, final=True)

    def text(self, r: int) -> str:
        # As Backend.generate decodes its responses: special tokens (EOS) skipped, whitespace stripped.
        return self.tokenizer.decode(self.tokens[r], skip_special_tokens=True).strip()

    def _send(self, r: int, *, final: bool) -> None:
        on_text = self.jobs[r].on_text
        if on_text is None:
            return
        text = self.text(r)
        if not final:
            cut = max(text.rfind(" "), text.rfind("\n"))
            text = text[:cut].rstrip() if cut > 0 else ""
            if text.endswith("\ufffd"):  # half of a multi-byte character
                return
        if len(text) > len(self.sent[r]) and text.startswith(self.sent[r]):
            # The guard scored every row at the first step, before the first token reached this streamer.
            assert self.guard.flagged_ is not None and self.guard.scores_ is not None
            on_text(text[len(self.sent[r]) :], bool(self.guard.flagged_[r]), float(self.guard.scores_[r]))
            self.sent[r] = text
        elif final and text != self.sent[r]:
            log.warning("serve: streamed text %r is not a prefix of the final text %r", self.sent[r], text)


class Engine:
    """The loaded backend and guard; `run` answers one batch of jobs (called from one thread at a time)."""

    def __init__(self, backend: Any, guard: ProbeGuard) -> None:
        self.backend, self.guard = backend, guard
        # The ids Backend.generate pads with and stops at, so that answers equal `lvlmlp generate`'s.
        self.pad_id: int = backend.pad_id
        self.eos_ids: set[int] = set(backend.eos_ids)

    @torch.inference_mode()
    def run(self, jobs: list[Job]) -> list[Result]:
        backend, guard = self.backend, self.guard
        batch = backend.encode([j.image for j in jobs], [j.question for j in jobs])
        max_new_tokens = max(j.max_tokens for j in jobs)
        if len(jobs) > 1 and backend.padded_length_error(batch, max_new_tokens):
            # Padded rows this long differ from single runs (Llama 4's floor_scale), which `lvlmlp generate` refuses:
            # here every request runs alone (no padding), so each still gets its answer alone.
            log.info("serve: a padded batch of %d requests would reach the model's padded limit; running them one "
                     "at a time", len(jobs))
            return [result for job in jobs for result in self.run([job])]
        streamer = RowStreamer(backend.tokenizer, self.eos_ids, jobs, guard)
        processors = LogitsProcessorList([guard, RowSampler(jobs, backend.device)])
        settings = {"max_new_tokens": max_new_tokens, "logits_processor": processors,
                    "stopping_criteria": StoppingCriteriaList([RowLimit([j.max_tokens for j in jobs])]),
                    "streamer": streamer}
        with guard.watching(backend.model):
            # The backend's own decoding path, which applies the family's quirks as `lvlmlp generate` does (the
            # generic generate where the model's drops the guard: Janus), without its raw-logits bookkeeping; a
            # protocol backend's own generate (docs/backends.md).
            backend.model_generate(batch, do_sample=False, pad_token_id=self.pad_id, **settings)
        assert guard.scores_ is not None and guard.flagged_ is not None
        prompt_tokens = batch["attention_mask"].sum(1).tolist() if "attention_mask" in batch else [0] * len(jobs)
        return [
            Result(text=streamer.text(r), flagged=bool(guard.flagged_[r]), probe_score=float(guard.scores_[r]),
                   finish_reason=streamer.finish[r] or "length", prompt_tokens=int(prompt_tokens[r]),
                   completion_tokens=len(streamer.tokens[r]))
            for r in range(len(jobs))
        ]


class QueueFull(Exception):
    pass


class Batcher:
    """A bounded queue in front of one worker thread that runs `engine.run` on batches of up to `max_batch`."""

    def __init__(self, engine: Engine, *, max_batch: int = 8, batch_wait_ms: float = 10.0, max_queue: int = 64,
                 on_batch: Callable[[int], None] = lambda _: None) -> None:
        self.engine, self.max_batch, self.wait = engine, max_batch, batch_wait_ms / 1000.0
        self.on_batch = on_batch
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._loop, name="lvlmlp-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.queue.put(None)  # may wait for room: the worker keeps taking jobs until it sees this
        self._thread.join()
        while True:  # jobs queued after the stop mark are answered with an error, never left waiting
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.done(RuntimeError("the server is shutting down"))

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the request queue is full ({self.queue.maxsize} waiting)") from None

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            jobs, stop = [first], False
            deadline = time.perf_counter() + self.wait
            while len(jobs) < self.max_batch:
                try:
                    job = self.queue.get(timeout=max(deadline - time.perf_counter(), 0.0))
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
            self._run(jobs)
            if stop:
                return

    def _run(self, jobs: list[Job]) -> None:
        self.on_batch(len(jobs))
        try:
            results: list[Result | BaseException] = list(self.engine.run(jobs))
        except Exception as err:  # noqa: BLE001 - one request's failure must not fail the others or the server
            if len(jobs) == 1:
                log.exception("serve: generation failed")
                results = [err]
            else:  # find the culprit: every job alone
                for job in jobs:
                    self._run([job])
                return
        for job, result in zip(jobs, results):
            job.done(result)
