"""lvlmlp's generic JSON-lines manifest as a task, so `--task jsonl` works like any benchmark."""

from __future__ import annotations

from lvlmlp.data import read_manifest
from lvlmlp.tasks.base import Request, Task, select_manifest_rows

ALL = "all"

LAYOUT = """\
--data-root FILE.jsonl    a manifest (CONTRACT.md section 1): {"id", "image", "question", "label"?, "split"?, ...};
    --split S keeps the rows whose "split" is S (an error naming the splits present when none is);
    the default split "all" keeps every row (the same selection as `--data FILE.jsonl --split S`)
--data-root DIR           reads DIR/{split}.jsonl (rows get that split unless they name their own)
image paths: relative to the manifest's folder, or absolute; --image-root is not used"""


def load(req: Request) -> list[dict]:
    if req.data_root.is_dir():
        rows = read_manifest(req.annotation(f"{req.split}.jsonl"))
        for row in rows:
            row.setdefault("split", req.split)
        return rows
    rows = read_manifest(req.data_root)  # names the file when it is missing
    return rows if req.split == ALL else select_manifest_rows(rows, str(req.data_root), split=req.split)


TASK = Task(
    name="jsonl",
    description="a JSON-lines manifest in lvlmlp's format (ids, images, questions and labels as given)",
    kind="binary",
    splits=(),
    label_names=(),
    layout=LAYOUT,
    default_image_root=".",
    load=load,
    default_split=ALL,
)
