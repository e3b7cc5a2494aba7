"""Flags that several commands share (model selection, a registered task's rows) and their parsing.

Light at import: the library is imported inside the functions that read parsed arguments."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from lvlmlp.errors import LvlmlpError
from lvlmlp.ranges import COUNT, NONNEG

if TYPE_CHECKING:
    from lvlmlp.extraction.spec import BackendSpec


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="hub id or local folder of a vision-language checkpoint")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto | float32 | float16 | bfloat16")
    p.add_argument("--prompt-template", default=None, help='applied to the question first, e.g. "{question} Answer briefly."')
    p.add_argument("--raw-prompt", action="store_true", help="skip the chat template; pass the text as it is")
    p.add_argument("--system-prompt", default=None, metavar="TEXT",
                   help="a system turn before the user's (e.g. the llava_v1 line of the original LLaVA-1.5 runs, "
                   "docs/paper-protocol.md); default: the chat template's own")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the checkpoint's own Python code (the auto_map of its config.json), as transformers' "
                   "trust_remote_code; off by default: that code runs with your rights (docs/models.md)")


def add_backend_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default=None, metavar="MODULE:CLASS",
                   help="a model outside transformers' Auto classes: MODULE:CLASS or path/file.py:CLASS implementing "
                        "lvlmlp's backend protocol, built as CLASS(--model, device=, dtype=) (docs/backends.md)")


def backend_spec(args: argparse.Namespace, template: str | None) -> BackendSpec:
    """The model flags (--model, --device, --dtype, --raw-prompt, --system-prompt, --trust-remote-code, and
    --backend where the command has it) under the prompt `template`."""
    from lvlmlp.extraction.spec import BackendSpec

    return BackendSpec(args.model, device=args.device, dtype=args.dtype, prompt_template=template,
                       raw_prompt=args.raw_prompt, system_prompt=args.system_prompt,
                       trust_remote_code=args.trust_remote_code, backend=getattr(args, "backend", None))


def check_backend_flags(args: argparse.Namespace, template: str | None) -> None:
    """With --backend, refuse the flags that do not apply (the prompt is the backend's own, so is its loading)."""
    if getattr(args, "backend", None) is None:
        return
    given = [flag for flag, value in (("--ray", getattr(args, "ray", None)),
                                      ("--prompt-template / a task's prompt", template),
                                      ("--raw-prompt", args.raw_prompt or None), ("--system-prompt", args.system_prompt),
                                      ("--trust-remote-code", args.trust_remote_code or None),
                                      ("--vision", getattr(args, "vision", None) or None)) if value is not None]
    if given:
        raise LvlmlpError(f"--backend: the backend renders its own prompts and loads its own model, so "
                          f"it takes no {', '.join(given)}")


def protocol_backend(args: argparse.Namespace, template: str | None) -> Any:
    """The --backend backend (None without --backend), after refusing the flags that do not apply with it; built by
    the one backend factory (`BackendSpec.build`)."""
    if getattr(args, "backend", None) is None:
        return None
    check_backend_flags(args, template)
    return backend_spec(args, None).build()


def add_guard_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """The probe guard's flags, shared by `generate` and `serve` (`what`: "rows" or "requests")."""
    p.add_argument("--probe", required=True, help="probe folder from `lvlmlp probe train` (first-token logits)")
    p.add_argument("--allow-other-model", action="store_true",
                   help="apply a probe trained on another --model's features (e.g. the same weights by another path)")
    p.add_argument("--template", default=None,
                   help=f"text forced at the start of flagged {what}' answers (default without --answers: with "
                   "--task, the words its prompt style asks for (tasks/answers.yaml), else the original's "
                   "MM-SafetyBench text, lvlmlp.steering.guard.SAFETY_TEMPLATE: 'Sorry, answering this question ... "
                   "because')")
    p.add_argument("--answers", default=None,
                   help="LABEL1,LABEL0 such as Yes,No: every answer starts with the probe's prediction")
    p.add_argument("--threshold", type=float, default=None,
                   help=f"flag {what} with P(label 1) below this (default: the probe's threshold)")


def guard_mode(args: argparse.Namespace, command: str) -> tuple[str | None, dict[int, str] | None]:
    """(template, answers) of the guard flags: --answers, else --template, else with --task the words its prompt
    style asks for (`steering.guard.default_guard`), else the text the original forced on MM-SafetyBench
    (`SAFETY_TEMPLATE`), so that a plain `generate`/`serve` runs the paper's decoding."""
    from lvlmlp.steering.guard import default_guard, parse_answers

    if args.template is not None and args.answers is not None:
        raise LvlmlpError(f"{command}: give --template TEXT or --answers YES,NO, not both")
    answers = parse_answers(args.answers)
    if answers is None and args.template is None:
        task = getattr(args, "task", None)
        return default_guard(task, "" if getattr(args, "prompt_template", None) else getattr(args, "prompt_style",
                                                                                               None))
    return args.template, answers


def token_budget(args: argparse.Namespace, guard: Any, flag: str, default: int = 64) -> int:
    """New tokens per answer: the value of `flag` (refused when the forced text would not fit: the answers would
    stop inside it), else `default`, raised to the forced text's length when that is longer (so the default
    template never makes a command fail)."""
    from lvlmlp.steering.guard import SAFETY_TEMPLATE

    forced = guard.template_ids if guard.answer_ids is None else max(guard.answer_ids.values(), key=len)
    given = getattr(args, flag.lstrip("-").replace("-", "_"))
    if given is None:
        return max(default, len(forced))
    if len(forced) > given:
        what = ("an --answers label" if guard.answer_ids is not None else
                "--template" if args.template is not None else "the default template (SAFETY_TEMPLATE)"
                if guard.template == SAFETY_TEMPLATE else f"the task's default template {guard.template!r}")
        raise LvlmlpError(f"{what} is {len(forced)} tokens long but {flag} is {given}: give {flag} {len(forced)} or "
                          "more (more lets the model go on after it)")
    return int(given)


def add_task_arguments(parser: argparse.ArgumentParser, limit: bool = True, several: bool = False) -> None:
    """The flags that choose the rows: --data or a registered task (--task NAME ...), then which of them.
    `several`: --task, --data-root, --image-root and --prompt-style are repeatable (lists, in --task order)."""
    g = parser.add_argument_group("task input (instead of --data)")
    each = {"action": "append"} if several else {}
    again = " (repeatable: one per --task, in the same order)" if several else ""
    g.add_argument("--task", metavar="NAME", **each, help="a registered task (`lvlmlp tasks` lists them)"
                   + (" (repeatable: one adapter trained on every task's rows)" if several else ""))
    g.add_argument("--data-root", metavar="DIR", **each,
                   help="the task's annotation files (`lvlmlp tasks NAME`)" + again)
    g.add_argument(
        "--image-root", metavar="DIR", **each, help="the task's images (default: its usual place in --data-root)"
        + again
    )
    g.add_argument(
        "--prompt-style", metavar="STYLE", **each,
        help="a template of the task in tasks/prompts.yaml, e.g. oe, oeh or mq" + again
    )
    g.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a task-specific option, repeatable (e.g. categories=adversarial,random for pope, image_variant=SD "
        "for mmsafety; `lvlmlp tasks NAME` lists them)",
    )
    s = parser.add_argument_group("row selection (--data or --task)")
    s.add_argument("--split", metavar="S", help="rows of this split: a manifest's rows whose 'split' is S; a task's "
                   "split (default: every row of a manifest, the task's default split)")
    s.add_argument("--per-class", type=COUNT, metavar="K", help="K seeded-random rows per label (default: all)")
    if limit:
        s.add_argument("--limit", type=COUNT, metavar="N", help="N seeded-random rows (after --per-class; default: all)")
    s.add_argument("--seed", type=NONNEG, default=None, help="seed of the sampling (default 0)")


def input_flags(args: argparse.Namespace, *flags: str) -> dict[str, Any]:
    """{flag: path} of the inputs a command reads (its --data, --model, --data-root, --image-root, --probe, --run
    where it has them, and `flags`): what its outputs must not be, contain or lie inside (`lvlmlp.outputs`)."""
    names = ("--data", "--model", "--data-root", "--image-root", "--probe", "--run", *flags)
    return {flag: getattr(args, flag.lstrip("-").replace("-", "_"), None) for flag in names}


# Flags that only a registered task reads: given with --data they would do nothing, so they are refused.
_TASK_ONLY = (("data_root", "--data-root"), ("image_root", "--image-root"), ("prompt_style", "--prompt-style"),
              ("task_option", "--task-option"))


def selection(args: argparse.Namespace) -> dict[str, Any]:
    """The row selection the flags ask for, as recorded in a run's manifest; with --task, also the task and its
    prompt style (None for a --prompt-template of one's own), which `probe eval` reads for own-answer:paper."""
    sel = {"split": args.split, "per_class": args.per_class, "limit": getattr(args, "limit", None),
           "seed": 0 if args.seed is None else args.seed}
    if getattr(args, "task", None):
        from lvlmlp.tasks import get_task

        style = None if getattr(args, "prompt_template", None) else (args.prompt_style or
                                                                     get_task(args.task).default_prompt_style)
        sel.update(task=args.task, prompt_style=style)
    return sel


def task_rows_from_args(args: argparse.Namespace) -> tuple[list[dict], str | None]:
    """Rows and prompt template (without --prompt-style: the task's default style) from the flags of
    `add_task_arguments`. `--limit N` (when the caller defines it) takes a seeded random subset of the task's rows,
    so that a small run still covers every category."""
    from lvlmlp.tasks import get_task, parse_task_options, prompt_template

    if not args.task:
        raise LvlmlpError("--task is required to read a task's rows")
    task = get_task(args.task)
    if not args.data_root:
        raise LvlmlpError(f"--data-root is required with --task {task.name} (see `lvlmlp tasks {task.name}`)")
    options = parse_task_options(args.task_option)
    # Without --prompt-style, the task's default style (the original's: `oeh` for MathVista, the question for most).
    template = prompt_template(task.name, args.prompt_style)
    rows = task.rows(
        args.data_root,
        args.image_root,
        args.split,
        limit=getattr(args, "limit", None),
        per_class=args.per_class,
        seed=0 if args.seed is None else args.seed,
        **options,
    )
    return rows, template


def rows_from_args(args: argparse.Namespace, command: str, seed_used: bool = False,
                   default_split: str | None = None) -> tuple[list[dict], str | None, str]:
    """Rows, the task's prompt template (None for a manifest) and a name of the source, from --data or --task,
    selected by --split / --per-class / --limit the same way for both. `seed_used`: the command itself uses --seed
    (sampling in generation, a training seed), so a --seed with nothing to sample is not refused. `default_split`:
    the split without --split (a task's; a manifest's when its rows name splits, else every row)."""
    from lvlmlp.data import read_manifest
    from lvlmlp.tasks.base import select_manifest_rows

    if bool(args.data) == bool(args.task):
        raise LvlmlpError(f"{command}: give exactly one of --data MANIFEST.jsonl or --task NAME")
    if args.prompt_style is not None and getattr(args, "prompt_template", None) is not None:
        raise LvlmlpError(f"{command}: give --prompt-style or --prompt-template, not both (the template would win)")
    if args.data:
        for attr, flag in _TASK_ONLY:
            if getattr(args, attr, None):
                raise LvlmlpError(f"{flag} applies to --task NAME only; with --data it would do nothing")
        sel = selection(args)
        if args.seed is not None and sel["per_class"] is None and sel["limit"] is None and not seed_used:
            raise LvlmlpError(f"--seed: {command} has nothing to seed with --data unless --per-class or --limit")
        rows = read_manifest(args.data)
        split = sel["split"]
        if split is None and default_split is not None and any("split" in r for r in rows):
            split = args.split = default_split  # recorded as the selection
        rows = select_manifest_rows(rows, str(args.data), split=split, per_class=sel["per_class"],
                                    limit=sel["limit"], seed=sel["seed"])
        return rows, None, str(args.data)
    if args.split is None:
        args.split = default_split
    rows, template = task_rows_from_args(args)
    return rows, template, f"task {args.task}"


# transformers' bar setting before each --no-progress silenced it: `lvlmlp.cli.main` gives it back when the command
# returns, so that a Python caller (a notebook, a test) keeps its own setting after `main([..., "--no-progress"])`.
_BARS_BEFORE: list[bool] = []


def silence_progress_bars() -> None:
    """--no-progress: also hide transformers' own bars (weights loading), until the command returns."""
    from transformers.utils import logging as hf_logging

    _BARS_BEFORE.append(hf_logging.is_progress_bar_enabled())
    hf_logging.disable_progress_bar()


@contextmanager
def progress_bars_restored() -> Iterator[None]:
    """Around a command: transformers' bar setting afterwards is the one it had before (however the command ends)."""
    depth = len(_BARS_BEFORE)
    try:
        yield
    finally:
        if len(_BARS_BEFORE) > depth:
            from transformers.utils import logging as hf_logging

            enabled = _BARS_BEFORE[depth]
            del _BARS_BEFORE[depth:]
            (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
