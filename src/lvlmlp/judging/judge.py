"""`lvlmlp judge`: each response of a run judged through an OpenAI-compatible chat endpoint, as the original did.

What is sent per row (see docs/judge.md):
- VizWiz, MAD-Bench, MM-SafetyBench: the task's template of LVLM-LP `utils/annotate.py` filled with the question
  the model was asked (the prompt, as the original's output files hold it) and its response, as ONE system message,
  no other parameter (`get_res_from_gpt`);
- MathVista: MathVista's answer-extraction prompt as one user message, temperature 0, max_tokens 256; rows its
  rules extract without a model are not sent (`lvlmlp.judging.mathvista`).

Judgments are appended to `RUN/judgments.jsonl` as replies arrive (one fsynced line each, under the run folder's
lock); a re-run sends only the rows without a judgment of the same template and prompt. 429 and 5xx answers and
dropped connections are retried with exponential backoff (or the server's Retry-After); any other error answer
stops the judge with a one-line error, keeping what was judged.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import queue
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lvlmlp.errors import LvlmlpError
from lvlmlp.judging import mathvista as mv
from lvlmlp.judging import templates as tpl
from lvlmlp.judging.store import JudgmentLog, read_judgments

log = logging.getLogger("lvlmlp")


@dataclass(frozen=True)
class JudgeOptions:
    endpoint: str  # the OpenAI client's base_url, e.g. https://api.openai.com/v1 or http://localhost:8000/v1
    model: str | None = None  # None: the original's model for the task (templates.DEFAULT_MODELS)
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 4
    scenarios: tpl.ScenarioMode = "paper"  # MM-SafetyBench: see templates.scenario_value
    rounding: mv.Rounding = "paper"  # MathVista: see lvlmlp.judging.mathvista
    max_attempts: int = 8  # per request, the first included
    backoff: float = 1.0  # seconds before the first retry, doubled each time (capped at 60 s)
    timeout: float = 600.0  # seconds per request
    progress: bool = True

    def check(self) -> None:
        if self.concurrency < 1:
            raise LvlmlpError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.scenarios not in tpl.SCENARIO_MODES:
            raise LvlmlpError(f"scenario templates must be one of {', '.join(tpl.SCENARIO_MODES)}, got "
                              f"{self.scenarios!r}")
        if self.rounding not in mv.ROUNDINGS:
            raise LvlmlpError(f"MathVista rounding must be one of {', '.join(mv.ROUNDINGS)}, got {self.rounding!r}")


@dataclass
class Item:
    """One row's judgment to make: the request, or (MathVista's rules) the extraction made without one."""

    row_id: str
    template: str
    prompt: str
    messages: list[dict[str, str]]
    params: dict[str, Any]
    row: dict[str, Any]
    local_reply: str | None = None  # MathVista: extracted by rule, nothing sent

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.prompt.encode("utf-8")).hexdigest()


@dataclass
class Summary:
    run: Path
    model: str
    n_rows: int = 0
    n_done_before: int = 0  # judged by an earlier run of the judge, not sent again
    n_sent: int = 0
    n_by_rule: int = 0  # MathVista rows extracted without a request
    unreadable: list[str] = field(default_factory=list)  # row ids whose reply the rule could not read (all, this run)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    n_without_usage: int = 0

    def line(self) -> str:
        unread = (f"{len(self.unreadable)} unreadable repl{'y' if len(self.unreadable) == 1 else 'ies'} "
                  f"(verdict null: {', '.join(self.unreadable[:5])}{', ...' if len(self.unreadable) > 5 else ''})"
                  if self.unreadable else "0 unreadable replies")
        usage = (f"tokens sent {self.prompt_tokens}, received {self.completion_tokens}"
                 + (f" ({self.n_without_usage} replies without usage)" if self.n_without_usage else ""))
        rule = f", {self.n_by_rule} extracted by rule" if self.n_by_rule else ""
        return (f"{self.run}: judged {self.n_sent} rows with {self.model}{rule} ({self.n_done_before} judged "
                f"before, {self.n_rows} in all); {unread}; {usage}")


def question_of(meta: dict[str, Any], prompt_template: str | None) -> str:
    """The question the original filled in: the prompt the model was asked (its output files held the prompted
    question). `prompt_template` None: the row's question is that prompt already (runs imported from the original)."""
    from lvlmlp.tasks import apply_template

    return apply_template(prompt_template, meta["question"])


def build_items(run: Any, task: str, prompt_template: str | None, opts: JudgeOptions) -> list[Item]:
    """The judgment of every row with a response, in run order."""
    name = tpl.task_template(task)
    where = str(run.path)
    if not any(r is not None for r in run.responses):
        raise LvlmlpError(f"{where}: no responses to judge; extract with --max-new-tokens (e.g. 128)")
    items = []
    for meta in run.meta:
        response = meta.get("response")
        if response is None:
            continue
        if task == "mathvista":
            mv.check_row(meta, where)
            prompt = mv.extraction_prompt(meta["question"], response)
            items.append(Item(meta["id"], name, prompt, [{"role": "user", "content": prompt}],
                              dict(mv.REQUEST_PARAMS), meta, mv.rule_extraction(response, meta)))
            continue
        template = name
        if task == "mmsafety":
            if meta.get("scenario") is None:
                raise LvlmlpError(f"{where}: row {meta['id']!r} has no 'scenario' (the safety template depends on it)")
            template = tpl.safety_template_name(tpl.scenario_value(str(meta["scenario"]), opts.scenarios))
        if meta.get("question") is None:
            raise LvlmlpError(f"{where}: row {meta['id']!r} has no 'question'")
        prompt = tpl.fill(template, question_of(meta, prompt_template), response)
        items.append(Item(meta["id"], template, prompt, [{"role": "system", "content": prompt}], {}, meta))
    return items


def verdict_of(item: Item, reply: str | None, rounding: mv.Rounding) -> tuple[str | None, dict[str, Any]]:
    """(verdict, extra fields of the line): the template's rule, or MathVista's scoring of the extraction."""
    if item.template != tpl.MATHVISTA:
        return tpl.read_reply(item.template, reply), {}
    if reply is None or (item.local_reply is None and reply.strip() == ""):
        return None, {}  # an empty reply: the original asked again (get_chat_response), here it is counted
    extraction = reply if item.local_reply is not None else reply.strip()
    prediction = mv.normalize(extraction, item.row, rounding)
    return ("true" if prediction == item.row["answer"] else "false"), {"prediction": prediction}


def check_api_key(var: str) -> str:
    key = os.environ.get(var)
    if not key:
        raise LvlmlpError(f"--api-key-env {var}: the environment variable is not set (export {var}=...; any "
                          "non-empty value for a server without keys)")
    return key


def check_endpoint(url: str) -> None:
    """A TCP connection to the endpoint's host and port (no request), so a wrong URL fails before any row."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LvlmlpError(f"--endpoint {url}: expected an http(s) URL such as https://api.openai.com/v1")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise LvlmlpError(f"--endpoint {url}: invalid port") from None
    host, where = parts.hostname, ""
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname):  # the client goes through the proxy: probe it
        proxied = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port, where = proxied.hostname or "", proxied.port or 80, f" through the proxy {proxy}"
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as err:
        raise LvlmlpError(f"--endpoint {url}: unreachable{where} ({err.strerror or err})") from None


def _retry_after(err: Exception) -> float | None:
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return None if value is None else max(0.0, float(value))
    except ValueError:
        return None


def _ask(client: Any, model: str, item: Item, opts: JudgeOptions,
         sleep: Callable[[float], None] = time.sleep) -> tuple[str | None, Any]:
    """(the reply's content, its usage), retrying 429, 5xx and dropped connections."""
    import openai

    for attempt in range(1, opts.max_attempts + 1):
        try:
            resp = client.chat.completions.create(model=model, messages=item.messages, **item.params)
            if not resp.choices:
                raise LvlmlpError(f"row {item.row_id!r}: the endpoint's reply has no choices")
            return resp.choices[0].message.content, resp.usage
        except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as err:
            status = getattr(err, "status_code", None)
            if attempt == opts.max_attempts:
                raise LvlmlpError(f"row {item.row_id!r}: gave up after {attempt} attempts "
                                  f"({status or type(err).__name__}); judged rows are kept, re-run to resume") from None
            delay = _retry_after(err)
            sleep(min(60.0, opts.backoff * 2 ** (attempt - 1)) if delay is None else min(60.0, delay))
        except openai.APIStatusError as err:
            message = str(err).splitlines()[0][:300]
            raise LvlmlpError(f"row {item.row_id!r}: the endpoint answered {err.status_code} ({message})") from None
    raise AssertionError("unreachable")


def _judged(before: dict[str, Any], it: Item) -> bool:
    """The row has a judgment of this template and this filled text (not of an earlier response)."""
    old = before.get(it.row_id)
    return old is not None and old.template == it.template and old.prompt_sha256 == it.sha


def preflight(run_dir: str | Path, task: str, prompt_template: str | None, opts: JudgeOptions) -> None:
    """Before hours of extraction (`lvlmlp run`): the key variable and the endpoint are checked unless the run
    exists and judging it would send nothing."""
    from lvlmlp.extraction.store import open_run

    opts.check()
    try:
        run = open_run(run_dir)
        before = read_judgments(run.path)
        if all(it.local_reply is not None or _judged(before, it)
               for it in build_items(run, task, prompt_template, opts)):
            return
    except LvlmlpError:
        pass  # not extracted yet (or not finished): it will need the judge
    check_api_key(opts.api_key_env)
    check_endpoint(opts.endpoint)


def judge_run(run_dir: str | Path, task: str, prompt_template: str | None, opts: JudgeOptions) -> Summary:
    """Judge every response of the run not judged yet; returns the counts (`Summary.line()` prints them)."""
    from lvlmlp.extraction.store import open_run
    from lvlmlp.locking import locked_folder

    opts.check()
    tpl.task_template(task)  # a task without a judge: a one-line error before opening anything else
    model = opts.model or tpl.DEFAULT_MODELS[task]
    run = open_run(run_dir)
    items = build_items(run, task, prompt_template, opts)
    summary = Summary(run.path, str(model), n_rows=len(items))
    with locked_folder(run.path), JudgmentLog(run.path) as out:
        before = read_judgments(run.path)
        others = sorted({j.model for j in before.values() if j.model not in (None, model)})
        if others:
            raise LvlmlpError(f"{out.path}: holds judgments by {others[0]}, not {model}; judge with that model, "
                              "or move the file away to judge again")

        def done(it: Item) -> bool:
            return _judged(before, it)

        pending = [it for it in items if not done(it)]
        summary.n_done_before = len(items) - len(pending)
        summary.unreadable = [it.row_id for it in items if done(it) and before[it.row_id].verdict is None]

        def record(it: Item, reply: str | None, usage: Any, sent: bool) -> None:
            verdict, extra = verdict_of(it, reply, opts.rounding)
            tokens = None
            if usage is not None:
                tokens = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
                summary.prompt_tokens += usage.prompt_tokens or 0
                summary.completion_tokens += usage.completion_tokens or 0
            elif sent:
                summary.n_without_usage += 1
            line = {"id": it.row_id, "template": it.template, "prompt_sha256": it.sha,
                    "reply": "" if reply is None else reply, "verdict": verdict, "model": model, "sent": sent,
                    "usage": tokens, **extra}
            try:
                out.append(line)
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise LvlmlpError(f"{out.path}: no space left on device; judged rows are kept, free some "
                                      "space and re-run") from None
                raise
            if verdict is None:
                summary.unreadable.append(it.row_id)
            if sent:
                summary.n_sent += 1
            else:
                summary.n_by_rule += 1

        for it in [it for it in pending if it.local_reply is not None]:
            record(it, it.local_reply, None, sent=False)
        remote = [it for it in pending if it.local_reply is None]
        if remote:
            _send_all(remote, str(model), opts, record)
    return summary


def _send_all(items: list[Item], model: str, opts: JudgeOptions, record: Callable[..., None]) -> None:
    """At most `concurrency` requests in flight, each in a daemon thread (Ctrl-C does not wait for the requests in
    flight); each reply is recorded by this thread as it arrives."""
    from tqdm.auto import tqdm

    try:
        import openai
    except ImportError:
        raise LvlmlpError("lvlmlp judge needs the openai package: pip install 'lvlmlp[judge]'") from None
    key = check_api_key(opts.api_key_env)
    check_endpoint(opts.endpoint)
    client = openai.OpenAI(base_url=opts.endpoint, api_key=key, max_retries=0, timeout=opts.timeout)
    todo = iter(items)
    done: queue.Queue = queue.Queue()
    failure: BaseException | None = None
    in_flight = 0

    def ask(it: Item) -> None:
        try:
            done.put((it, _ask(client, model, it, opts), None))
        except BaseException as err:  # handed to the main thread, which raises it
            done.put((it, None, err))

    def submit() -> None:
        # Started as slots free up, so a failure or Ctrl-C leaves no queue of requests behind it.
        nonlocal in_flight
        while failure is None and in_flight < opts.concurrency:
            it = next(todo, None)
            if it is None:
                return
            threading.Thread(target=ask, args=(it,), name="lvlmlp-judge", daemon=True).start()
            in_flight += 1

    with tqdm(total=len(items), desc="judge", unit="row", file=sys.stderr, disable=not opts.progress) as bar:
        submit()
        while in_flight:
            it, result, err = done.get()
            in_flight -= 1
            if err is not None:  # the first failure stops new requests; the replies in flight are still kept
                failure = failure or err
            else:
                record(it, *result, sent=True)
                bar.update(1)
            submit()
    if failure is not None:
        raise failure


def run_prompt_template(run: Any, task: str, style: str | None, template: str | None = None) -> str | None:
    """The prompt template the run's model was asked with, for `question_of`: None for a run imported from the
    original (its questions are the prompts already); else `template` or the task's style (default: the task's
    default style), refused when the run's manifest shows another prompt."""
    from lvlmlp.tasks import get_task, prompt_template

    manifest = run.manifest
    if manifest.get("source") == "import-legacy":
        return None
    if template is not None:
        if "{question}" not in template:
            raise LvlmlpError(f"--prompt-template {template!r}: has no {{question}} placeholder")
        flag = "--prompt-template"
    else:
        style = style or get_task(task).default_prompt_style
        for key, given in (("task", task), ("prompt_style", style)):
            if manifest.get(key) is not None and manifest[key] != given:
                raise LvlmlpError(f"--{key.replace('_', '-')} {given}: the run {run.path} was extracted with "
                                  f"{key} {manifest[key]!r}")
        template, flag = prompt_template(task, style), f"--prompt-style {style}"
    used = manifest.get("prompt_template")
    if isinstance(used, str) and template not in used:
        raise LvlmlpError(f"{flag}: the run {run.path} was not extracted with this prompt (its manifest's "
                          f"prompt_template is {used[:80]!r}); give the prompt it was extracted with")
    return template
