"""MAD-Bench-style deception: normal questions (1) against questions with a false premise (0).

The paper's files record each image as an absolute path on the authors' machine, so images are found by file
NAME under a local COCO val2017 folder.
"""

from __future__ import annotations

from pathlib import PurePosixPath, PureWindowsPath

from lvlmlp.tasks.base import Request, Task, read_json, require

NORMAL = "Normal"
DECEPTIVE = (
    "CountOfObject",
    "NonexistentObject",
    "ObjectAttribute",
    "SceneUnderstanding",
    "SpatialRelationship",
)
N_TRAIN = {NORMAL: 100, **{c: 20 for c in DECEPTIVE}}  # the paper's 200 training rows

LAYOUT = """\
<data-root>/Normal.json                  label 1 (normal)
<data-root>/CountOfObject.json           label 0 (deceptive), likewise NonexistentObject.json,
    ObjectAttribute.json, SceneUnderstanding.json, SpatialRelationship.json
    each a JSON array of {"image_id", "file", "caption": [...], "Question(GPT)"}
<image-root>/000000547816.jpg ...        COCO val2017, matched by the file NAME of "file";
    default <data-root>/val2017
splits: train = the first 100 Normal and first 20 of each deceptive category (200 rows with the real files);
    test = the rest (1,800), also called val (the original's scripts: --split val); row id: CATEGORY/INDEX"""


def load(req: Request) -> list[dict]:
    paths = {c: req.annotation(f"{c}.json") for c in (NORMAL, *DECEPTIVE)}
    images = req.images("val2017")
    rows = []
    for category, path in paths.items():
        records = read_json(path, req.task)
        if not isinstance(records, list):
            raise req.error(f"{path}: expected a JSON array")
        for i, rec in enumerate(records):
            if (i < N_TRAIN[category]) != (req.split == "train"):
                continue
            where = f"{req.task}: {path}: item {i}"
            rows.append(
                {
                    "id": f"{category}/{i}",
                    "image": str(images / _file_name(require(rec, "file", where))),
                    "question": require(rec, "Question(GPT)", where),
                    "label": int(category == NORMAL),
                    "category": category,
                    "image_id": rec.get("image_id"),
                }
            )
    return rows


def _file_name(path: str) -> str:
    # The authors' paths are POSIX; a Windows-made copy would use backslashes. Either way keep the last part.
    return PureWindowsPath(PurePosixPath(path).name).name


TASK = Task(
    name="mad",
    description="MAD-Bench deceptive questions: does the question fit the image? (normal = 1, deceptive = 0)",
    kind="binary",
    splits=("train", "test"),
    split_aliases=(("val", "test"),),  # the original's name of the test part (dataset/MADBench.py, scripts/MAD)
    label_names=("deceptive", "normal"),
    layout=LAYOUT,
    default_image_root="val2017",
    load=load,
)
