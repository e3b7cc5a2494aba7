"""VizWiz-VQA answerability: questions from blind users, label 1 when the question can be answered."""

from __future__ import annotations

from pathlib import Path

from lvlmlp.tasks.base import Request, Task, read_json, require

LAYOUT = """\
<data-root>/{split}.json              the original code's layout (train.json, val.json, test.json), or
<data-root>/Annotations/{split}.json  the official release's; either a JSON array of
    {"image", "question", "answers", "answer_type", "answerable"}; test has no "answerable" (rows without label)
<image-root>/VizWiz_val_00000000.jpg ...  default <data-root>/{split}/ (train/, val/, test/)
label: answerable (1) / unanswerable (0); row id: the image file's stem"""


def load(req: Request) -> list[dict]:
    # The original code reads ROOT/{split}.json; the official download keeps the files in Annotations/.
    flat = req.data_root / f"{req.split}.json"
    path = flat if flat.is_file() else req.annotation(Path("Annotations") / f"{req.split}.json")
    records = read_json(path, req.task)
    if not isinstance(records, list):
        raise req.error(f"{path}: expected a JSON array of questions")
    images = req.images(req.split)
    rows = []
    for i, rec in enumerate(records):
        where = f"{req.task}: {path}: item {i}"
        image = require(rec, "image", where)
        row = {
            "id": Path(image).stem,
            "image": str(images / image),
            "question": require(rec, "question", where),
            "answer_type": rec.get("answer_type"),
            # The test split publishes no answers; the field stays absent rather than empty.
            **({"answers": [_answer_text(a) for a in rec["answers"]]} if rec.get("answers") else {}),
        }
        if rec.get("answerable") is not None:
            row["label"] = int(rec["answerable"])
        rows.append(row)
    return rows


def _answer_text(answer: dict | str) -> str:
    # The official files hold {"answer", "answer_confidence"} objects; converted copies often hold plain strings.
    return answer.get("answer", "") if isinstance(answer, dict) else str(answer)


TASK = Task(
    name="vizwiz",
    description="VizWiz-VQA: is the question answerable from the photo? (answerable = 1)",
    kind="binary",
    splits=("train", "val", "test"),
    label_names=("unanswerable", "answerable"),
    layout=LAYOUT,
    default_image_root="{split}",
    load=load,
    default_split="val",
)
