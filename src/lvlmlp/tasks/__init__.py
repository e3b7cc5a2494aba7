"""Task registry: the paper's benchmarks as small adapters that turn their own files into rows.

```python
from lvlmlp.tasks import get_task, prompt_template
rows = get_task("pope").rows("/data/pope", split="val", categories=["random"])
template = prompt_template("vizwiz", "oeh")  # contains "{question}"
```
Each adapter module (vizwiz, mmsafety, mad, mathvista, pope, imagenet, jsonl) defines one `TASK`; this module
collects them and loads `prompts.yaml` (the command `lvlmlp tasks [NAME]` lives in lvlmlp/commands/tasks.py).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml

from lvlmlp.errors import LvlmlpError
from lvlmlp.tasks import imagenet, jsonl, mad, mathvista, mmsafety, pope, vizwiz
from lvlmlp.tasks.base import Request, Task

__all__ = [
    "Request",
    "Task",
    "get_task",
    "list_tasks",
    "prompt_styles",
    "prompt_template",
]

_TASKS: dict[str, Task] = {
    t.name: t
    for t in (vizwiz.TASK, mmsafety.TASK, mad.TASK, pope.TASK, mathvista.TASK, imagenet.TASK, jsonl.TASK)
}
PROMPTS_FILE = Path(__file__).with_name("prompts.yaml")


def get_task(name: str) -> Task:
    """The registered task called `name`; an unknown name lists the known ones."""
    try:
        return _TASKS[name]
    except KeyError:
        raise LvlmlpError(f"unknown task {name!r} (known: {', '.join(_TASKS)})") from None


def list_tasks() -> list[Task]:
    return list(_TASKS.values())


@cache
def _prompts() -> dict[str, dict[str, str]]:
    with PROMPTS_FILE.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def prompt_styles(task: str) -> tuple[str, ...]:
    """The prompt styles `prompts.yaml` defines for a task (always at least "oe")."""
    get_task(task)
    return tuple(_prompts().get(task, {}))


def prompt_template(task: str, style: str = "oe") -> str:
    """The template of `style` for `task`, with "{question}" where the row's question goes."""
    styles = prompt_styles(task)
    if style not in styles:
        raise LvlmlpError(f"task {task}: unknown prompt style {style!r} (styles: {', '.join(styles)})")
    return _prompts()[task][style]


def describe(task: Task) -> str:
    """The text of `lvlmlp tasks NAME`."""
    labels = ", ".join(f"{i} = {n}" for i, n in enumerate(task.label_names)) or "as given (class index)"
    if task.needs_generation:
        labels += " (computed from the model's responses)"
    lines = [
        f"{task.name}: {task.description}",
        f"kind: {task.kind}",
        f"labels: {labels}",
        f"splits: {', '.join(task.splits) or 'any'} (default {task.default_split})",
        f"prompt styles: {', '.join(prompt_styles(task.name))}",
        f"default image root: <data-root>{'' if task.default_image_root == '.' else '/' + task.default_image_root}",
    ]
    lines += [f"option {name}: {help_}" for name, help_ in task.options]
    lines += ["layout:", *("  " + line for line in task.layout.splitlines())]
    return "\n".join(lines)
