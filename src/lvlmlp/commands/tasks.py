"""`lvlmlp tasks [NAME] [--dump FILE ...]`: the registered tasks, one task's expected files, splits, labels and
prompts, or the rows extraction would use (with their prompt text) written as JSON lines."""

from __future__ import annotations

import argparse

from lvlmlp.errors import LvlmlpError
from lvlmlp.ranges import COUNT, NONNEG

# (attribute, flag) of the options that only --dump reads: given without it they would do nothing.
_DUMP_ONLY = (("data_root", "--data-root"), ("image_root", "--image-root"), ("split", "--split"),
              ("prompt_style", "--prompt-style"), ("task_option", "--task-option"), ("per_class", "--per-class"),
              ("seed", "--seed"))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tasks", help="list the registered tasks, show one task's expected files, or dump its rows")
    p.add_argument("name", nargs="?", help="a task name: print its layout, splits, labels and prompt styles")
    p.add_argument("--dump", metavar="FILE", help="write the rows extraction would use, with their prompt, as "
                   "JSON lines (id, image, question, prompt, label, split, metadata)")
    p.add_argument("--data-root", metavar="DIR", help="with --dump: the task's annotation files")
    p.add_argument("--image-root", metavar="DIR", help="with --dump: the task's images")
    p.add_argument("--split", metavar="S", help="with --dump: the split (default: the task's default split)")
    p.add_argument("--prompt-style", metavar="STYLE", help="with --dump: a style of tasks/prompts.yaml "
                   "(default: the task's default style)")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE", help="with --dump: repeatable")
    p.add_argument("--per-class", type=COUNT, metavar="K", help="with --dump: K seeded-random rows per label")
    p.add_argument("--seed", type=NONNEG, default=None, help="with --dump: seed of every sampling step (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lvlmlp.tasks import describe, dump_rows, get_task, list_tasks, parse_task_options

    if not args.dump:
        for attr, flag in _DUMP_ONLY:
            if getattr(args, attr):
                raise LvlmlpError(f"tasks: {flag} applies to --dump only (lvlmlp tasks NAME --data-root DIR "
                                  "--dump FILE)")
    if args.name is None:
        if args.dump:
            raise LvlmlpError("tasks --dump needs a task name: lvlmlp tasks NAME --data-root DIR --dump FILE")
        width = max(len(t.name) for t in list_tasks())
        for t in list_tasks():
            print(f"{t.name:<{width}}  {t.description}")
        return 0
    if args.dump:
        from lvlmlp.outputs import check_output

        check_output(args.dump, None, {"--data-root": args.data_root, "--image-root": args.image_root}, "--dump")
        if not args.data_root:
            raise LvlmlpError(f"tasks --dump needs --data-root (see `lvlmlp tasks {args.name}`)")
        n = dump_rows(args.name, args.data_root, args.dump, image_root=args.image_root, split=args.split,
                      style=args.prompt_style, per_class=args.per_class, seed=0 if args.seed is None else args.seed,
                      **parse_task_options(args.task_option))
        print(f"{args.dump}: {n} rows")
        return 0
    print(describe(get_task(args.name)))
    return 0
