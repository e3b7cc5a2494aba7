"""`lvlmlp tasks [NAME]`: the registered tasks, or one task's expected files, splits, labels and prompts."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tasks", help="list the registered tasks, or show one task's expected files")
    p.add_argument("name", nargs="?", help="a task name: print its layout, splits, labels and prompt styles")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lvlmlp.tasks import describe, get_task, list_tasks

    if args.name is None:
        width = max(len(t.name) for t in list_tasks())
        for t in list_tasks():
            print(f"{t.name:<{width}}  {t.description}")
        return 0
    print(describe(get_task(args.name)))
    return 0
