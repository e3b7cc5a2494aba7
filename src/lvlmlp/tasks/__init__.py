"""Task registry: the paper's benchmarks as small adapters that turn their own files into rows.

```python
from lvlmlp.tasks import dump_rows, get_task, prompt_template
rows = get_task("pope").rows("/data/pope", split="val", categories=["random"])
template = prompt_template("vizwiz", "oeh")  # contains "{question}"; no style: the task's default style
dump_rows("mad", "/data/madbench", "dump.jsonl", image_root="/data/coco/val2017", split="train", style="mq")
```
Each adapter module (vizwiz, mmsafety, mad, mathvista, pope, imagenet, jsonl) defines one `TASK` (world: the
demo world's six analogues, `world-answerability` ...); this module
collects them and loads `prompts.yaml` (the command `lvlmlp tasks [NAME]` lives in lvlmlp/commands/tasks.py).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml

from lvlmlp.data import write_jsonl
from lvlmlp.errors import LvlmlpError
from lvlmlp.tasks import imagenet, jsonl, mad, mathvista, mmsafety, pope, vizwiz, world
from lvlmlp.tasks.base import Request, Task

__all__ = [
    "Request",
    "Task",
    "DATASET_ANSWER",
    "answer_words",
    "apply_template",
    "dump_rows",
    "parse_task_options",
    "prompted_rows",
    "get_task",
    "list_tasks",
    "prompt_styles",
    "prompt_template",
]

_TASKS: dict[str, Task] = {
    t.name: t
    for t in (vizwiz.TASK, mmsafety.TASK, mad.TASK, pope.TASK, mathvista.TASK, imagenet.TASK, jsonl.TASK, *world.TASKS)
}
PROMPTS_FILE = Path(__file__).with_name("prompts.yaml")
ANSWERS_FILE = Path(__file__).with_name("answers.yaml")  # the words each prompt asks for, per label
DATASET_ANSWER = "=answer"  # answers.yaml's marker: the dataset's answer to the row's question
_LABEL_WORD = "=label"  # answers.yaml's marker: the task's label name (POPE's yes / no)


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


@cache
def _answers() -> dict[str, dict[str, dict[int, str]]]:
    with ANSWERS_FILE.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def answer_words(task: str, style: str | None = None) -> dict[int, str]:
    """The words `task`'s prompt `style` (default: the task's default style) asks the model to say, per label
    (answers.yaml): {1: ..., 0: ...}, a label missing when the prompt defines no words for it. A label-name
    marker is resolved here (POPE: {1: "yes", 0: "no"}); `DATASET_ANSWER` stays: each row's own answer."""
    template_style = get_task(task).default_prompt_style if style is None else style
    prompt_template(task, template_style)  # an unknown style is an error naming the styles
    words = dict(_answers().get(task, {}).get(template_style, {}))
    names = get_task(task).label_names
    return {int(label): names[int(label)] if text == _LABEL_WORD else str(text) for label, text in words.items()}


def prompt_template(task: str, style: str | None = None) -> str:
    """The template of `style` (default: the task's `default_prompt_style`) for `task`, with "{question}" where
    the row's question goes."""
    styles = prompt_styles(task)
    style = get_task(task).default_prompt_style if style is None else style
    if style not in styles:
        raise LvlmlpError(f"task {task}: unknown prompt style {style!r} (styles: {', '.join(styles)})")
    return _prompts()[task][style]


def apply_template(template: str | None, question: str) -> str:
    """The text the model is asked: the template with the question substituted (the original's `template % q`)."""
    return template.replace("{question}", question) if template else question


def prompted_rows(rows: list[dict], template: str | None) -> list[dict]:
    """Rows as `--dump` writes them: `id`, `image`, `question`, `prompt`, `label`, `split`, then the metadata."""
    out = []
    for row in rows:
        head = {k: row.get(k) for k in ("id", "image", "question")}
        head["prompt"] = apply_template(template, row["question"])
        head["label"], head["split"] = row.get("label"), row.get("split")
        out.append({**head, **{k: v for k, v in row.items() if k not in head}})
    return out


def dump_rows(
    task: str,
    data_root: str | Path,
    out: str | Path,
    *,
    image_root: str | Path | None = None,
    split: str | None = None,
    style: str | None = None,
    **options: Any,
) -> int:
    """Write the rows extraction would use (with their prompt text) to `out` as JSON lines; returns the count.
    `options` go to `Task.rows` (limit, per_class, seed and the task's own options)."""
    rows = prompted_rows(get_task(task).rows(data_root, image_root, split, **options), prompt_template(task, style))
    write_jsonl(out, rows)  # atomic: a crash mid-write leaves the previous dump intact
    return len(rows)


def describe(task: Task) -> str:
    """The text of `lvlmlp tasks NAME`."""
    labels = ", ".join(f"{i} = {n}" for i, n in enumerate(task.label_names)) or "as given (class index)"
    if task.needs_generation:
        labels += " (computed from the model's responses)"
    lines = [
        f"{task.name}: {task.description}",
        f"kind: {task.kind}",
        f"labels: {labels}",
        f"splits: {task.split_names or 'any'} (default {task.default_split})",
        f"prompt styles: {', '.join(prompt_styles(task.name))} (default {task.default_prompt_style})",
        *(f"answer words of {style}: " + ", ".join(f"{label} = {'the dataset answer' if w == DATASET_ANSWER else repr(w)}"
                                                 for label, w in sorted(words.items(), reverse=True))
          for style in prompt_styles(task.name) if (words := answer_words(task.name, style))),
        f"default image root: <data-root>{'' if task.default_image_root == '.' else '/' + task.default_image_root}",
    ]
    lines += [f"option {name}: {help_}" for name, help_ in task.options]
    lines += ["layout:", *("  " + line for line in task.layout.splitlines())]
    return "\n".join(lines)


def parse_task_options(items: list[str]) -> dict[str, Any]:
    """`--task-option KEY=VALUE` items as a dict."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LvlmlpError(f"--task-option {item!r}: expected KEY=VALUE")
        options[key.strip()] = value.strip()
    return options
