"""The `Task` record every adapter registers, the request it receives, and the helpers adapters share.

A task is data: a name, labels, splits, a layout description and one small `load` function that turns the
benchmark's own files into rows. Everything generic (split checks, option checks, seeded sampling, row
validation) lives here so adapters stay a page long.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lvlmlp.data import iter_json_lines, selected, validate_rows
from lvlmlp.errors import LvlmlpError
from lvlmlp.ranges import Range

KINDS = ("binary", "multiclass", "binary-from-response")


@dataclass(frozen=True)
class Request:
    """What `Task.rows` hands an adapter's `load`: resolved paths, the split and the task's own options."""

    task: str
    data_root: Path
    image_root: Path | None  # None: the adapter's default place under the data root
    split: str
    options: dict[str, Any]
    per_class: int | None = None  # for adapters that sample per class themselves (`Task.samples_per_class`)
    seed: int | None = 0

    def annotation(self, relative: str | Path) -> Path:
        """`data_root / relative`, or a one-line error naming the expected path and where the layout is shown."""
        path = self.data_root / relative
        if not path.exists():
            raise LvlmlpError(f"{self.task}: annotations not found: {path} {self.see_layout}")
        return path

    def images(self, default: str | Path) -> Path:
        """The image folder (`--image-root`, else `data_root / default`); it must exist, single files are the
        extractor's business."""
        root = self.image_root if self.image_root is not None else self.data_root / default
        if not root.is_dir():
            how = "--image-root" if self.image_root is not None else f"default <data-root>/{default}"
            raise LvlmlpError(f"{self.task}: image folder not found: {root} ({how}) {self.see_layout}")
        return root

    @property
    def see_layout(self) -> str:
        return f"(expected layout: `lvlmlp tasks {self.task}`)"

    def error(self, message: str) -> LvlmlpError:
        return LvlmlpError(f"{self.task}: {message}")


Loader = Callable[[Request], list[dict]]
LabelFn = Callable[[str, dict], int]  # (the model's response, the row) -> the row's label


@dataclass(frozen=True)
class Task:
    """A registered benchmark. `rows()` is the one entry point; the other fields document it.

    Binary labels: 1 is the "good" class whose probability the probe scores (`label_names[1]`), e.g. answerable,
    safe, normal, "yes", correct.

    A task also owns its rules, which general modules ask it for instead of naming a task: `label_fn` (the label
    of a row from the model's response, for tasks whose labels need generation, e.g. MathVista's answer checker),
    `answer_fn` (the label the model's answer states on its own, the `own-answer:task` baseline; for a multiclass
    task the class it names, -1 for none) and `groups` (per-group metrics: the row field to group by and a metric
    of `lvlmlp.probing.metrics.GROUP_METRICS`,
    e.g. MM-SafetyBench's attack success rate per `scenario`).
    """

    name: str
    description: str
    kind: str  # one of KINDS
    splits: tuple[str, ...]  # empty: any split name (the generic manifest)
    label_names: tuple[str, ...]
    layout: str  # the files expected under --data-root and --image-root, shown by `lvlmlp tasks NAME`
    default_image_root: str  # relative to the data root; documentation, adapters resolve it in `load`
    load: Loader = field(repr=False, compare=False)
    default_split: str = "test"
    # (alias, split) pairs: another name of a split, e.g. MAD-Bench's "val" (the original's name of its test part)
    split_aliases: tuple[tuple[str, str], ...] = ()
    label_fn: LabelFn | None = field(default=None, repr=False, compare=False)  # label from the response
    answer_fn: LabelFn | None = field(default=None, repr=False, compare=False)  # the answer read as a label
    samples_per_class: bool = False  # `load` applies `per_class` itself, before building rows (ImageNet's files)
    options: tuple[tuple[str, str], ...] = ()  # (name, help) of the task-specific keyword options
    default_prompt_style: str = "oe"  # the style of tasks/prompts.yaml used when none is chosen
    groups: tuple[tuple[str, str], ...] = ()  # (row field, group metric) pairs for per-group metrics

    @property
    def needs_generation(self) -> bool:
        """Labels are a function of the model's response (MathVista): extraction must generate."""
        return self.label_fn is not None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name}: kind must be one of {KINDS}, got {self.kind!r}")

    def rows(
        self,
        data_root: str | Path,
        image_root: str | Path | None = None,
        split: str | None = None,
        *,
        limit: int | None = None,
        per_class: int | None = None,
        seed: int | None = 0,
        **options: Any,
    ) -> list[dict]:
        """Rows of one split, in the benchmark's own order, optionally sampled.

        `per_class=K` keeps K seeded-random rows of each label (all of a smaller class); `limit=N` then keeps N
        seeded-random rows, or the first N when `seed` is None. Sampled rows keep their original order.
        `split=None` means the task's `default_split`; an alias (`split_aliases`) means its split, whose name the
        rows carry.
        """
        split = self.default_split if split is None else dict(self.split_aliases).get(split, split)
        if self.splits and split not in self.splits:
            raise LvlmlpError(f"{self.name}: unknown split {split!r} (splits: {self.split_names})")
        known = {name for name, _ in self.options}
        unknown = sorted(set(options) - known)
        if unknown:
            raise LvlmlpError(
                f"{self.name}: unknown option {unknown[0]!r} (options: {', '.join(sorted(known)) or 'none'})"
            )
        check_sample_sizes(self.name, limit=limit, per_class=per_class)
        request = Request(
            task=self.name,
            data_root=Path(data_root).expanduser().resolve(),
            image_root=None if image_root is None else Path(image_root).expanduser().resolve(),
            split=split,
            options=dict(options),
            per_class=per_class,
            seed=seed,
        )
        rows = self.load(request)
        if self.splits:  # fixed-split benchmarks tag their rows; a manifest's rows keep what they say
            for row in rows:
                row.setdefault("split", split)
        rows = sample_rows(rows, None if self.samples_per_class else per_class, limit, seed,
                           source=f"{self.name} split {split}")
        if not rows:
            raise LvlmlpError(f"{self.name}: no rows in split {split!r} under {request.data_root}")
        return validate_rows(rows, f"{self.name} split {split}")  # once: a manifest's rows were checked when read

    @property
    def split_names(self) -> str:
        """The splits and their aliases in words: "train, test; val = test"."""
        return "; ".join([", ".join(self.splits), *(f"{alias} = {split}" for alias, split in self.split_aliases)])

    def label_names_at(self, data_root: str | Path) -> tuple[str, ...]:
        """Class names, read from the data root for tasks whose names live there (ImageNet)."""
        del data_root  # only ImageNet overrides this, see `imagenet.ImageNetTask`
        return self.label_names


def check_sample_sizes(source: str, **sizes: int | None) -> None:
    """`limit`/`per_class` are positive integers when given."""
    for name, value in sizes.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise LvlmlpError(f"{source}: {name} must be a positive integer, got {value!r}")


def sample_rows(rows: list[dict], per_class: int | None, limit: int | None, seed: int | None, source: str) -> list[dict]:
    """`per_class` then `limit` sampling (each seeded, original order kept): the one way rows are sampled, for a
    task's rows and a manifest's alike."""
    if per_class is not None:
        rows = selected(rows, sample_per_class(rows, per_class, seed, source=source))
    if limit is not None:
        rows = selected(rows, sample_limit(rows, limit, seed))
    return rows


def select_manifest_rows(
    rows: list[dict],
    source: str,
    *,
    split: str | None = None,
    per_class: int | None = None,
    limit: int | None = None,
    seed: int | None = 0,
) -> list[dict]:
    """A manifest's rows for `--split S --per-class K --limit N`: the rows whose "split" is S (an error naming the
    splits present when none is), then sampled exactly as a task's rows are (`sample_rows`)."""
    check_sample_sizes(source, limit=limit, per_class=per_class)
    if split is not None:
        kept = selected(rows, (row for row in rows if row.get("split") == split))
        if not kept:
            present = sorted({str(row["split"]) for row in rows if row.get("split") is not None})
            have = f"splits present: {', '.join(present)}" if present else "no row has a 'split' field"
            raise LvlmlpError(f"{source}: no row has split {split!r} ({have})")
        rows = kept
    rows = sample_rows(rows, per_class, limit, seed, source)
    if not rows:
        raise LvlmlpError(f"{source}: no rows")
    return rows


def sample_per_class(rows: list[dict], k: int, seed: int | None, source: str) -> list[dict]:
    """K rows per label: seeded random picks (the first K when seed is None), original order kept."""
    by_label: dict[int, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        if row.get("label") is None:
            raise LvlmlpError(f"{source}: per-class sampling needs labels, row {row.get('id')!r} has none")
        by_label[row["label"]].append(i)
    rng = random.Random(seed)
    keep: list[int] = []
    for label in sorted(by_label):
        idx = by_label[label]
        keep.extend(idx if len(idx) <= k else (idx[:k] if seed is None else rng.sample(idx, k)))
    return [rows[i] for i in sorted(keep)]


def sample_limit(rows: list[dict], n: int, seed: int | None) -> list[dict]:
    """N rows: a seeded random subset in original order, or the first N when seed is None."""
    if len(rows) <= n:
        return rows
    if seed is None:
        return rows[:n]
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), n))]


def read_json(path: Path, task: str) -> Any:
    """Parse a JSON file; a broken file is a one-line error naming it."""
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise LvlmlpError(f"{task}: {path}: not valid JSON ({err.msg}, line {err.lineno})") from None


def read_json_lines(path: Path, task: str) -> list[dict]:
    """Parse a JSON-lines file (POPE's `.json` files are JSON lines, one object per line)."""
    return [obj for _, obj in iter_json_lines(path, f"{task}: ")]


def require(record: dict, key: str, where: str) -> Any:
    """`record[key]`, or an error naming the file/record that lacks it."""
    if key not in record or record[key] is None:
        raise LvlmlpError(f"{where}: missing field {key!r}")
    return record[key]


def as_list(value: Any, option: str, task: str) -> list[str]:
    """An option given as a list or a comma-separated string (what `--task-option k=a,b` yields)."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    raise LvlmlpError(f"{task}: option {option!r} must be a list or comma-separated string, got {value!r}")


def as_int(value: Any, option: str, task: str, minimum: int = 1) -> int | None:
    """An integer option (a count unless `minimum` says otherwise) that may arrive as a string from the command
    line; "none" disables it."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise LvlmlpError(f"{task}: option {option!r} must be an integer, got {value!r}") from None
    return Range(int, minimum).check(number, f"{task}: option {option!r}")
