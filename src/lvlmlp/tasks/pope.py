"""POPE object hallucination: "Is there a X in the image?" with the ground truth yes (1) / no (0)."""

from __future__ import annotations

from lvlmlp.tasks.base import Request, Task, as_int, as_list, read_json_lines, require, sample_limit

CATEGORIES = ("adversarial", "popular", "random")
TRAIN_CAP = 6000  # questions per category kept from a (much larger) generated train split, seeded

LAYOUT = """\
<data-root>/coco_{split}_pope_{category}.json   JSON lines {"question_id", "image", "text", "label": "yes"|"no"}
<data-root>/coco_pope_{category}.json           the original release (COCO val2014), used for val and test
    when the split-named file is absent; category: adversarial, popular, random
<image-root>/COCO_val2014_000000310196.jpg ...  default <data-root>/val2014 (<data-root>/train2014 for train)
options: categories (default all three, e.g. --task-option categories=adversarial,random);
    max_per_category (train only, default 6000: a seeded random subset in file order; "none" keeps all)
label: yes (1) / no (0); row id: CATEGORY/QUESTION_ID"""


def load(req: Request) -> list[dict]:
    categories = as_list(req.options.get("categories", list(CATEGORIES)), "categories", req.task)
    for c in categories:
        if c not in CATEGORIES:
            raise req.error(
                f"unknown category {c!r} in option categories (choose from {', '.join(CATEGORIES)})"
            )
    cap = as_int(req.options.get("max_per_category", TRAIN_CAP), "max_per_category", req.task)
    images = req.images("train2014" if req.split == "train" else "val2014")
    rows = []
    for category in categories:
        path = req.data_root / f"coco_{req.split}_pope_{category}.json"
        if (
            not path.exists()
            and req.split != "train"
            and (req.data_root / f"coco_pope_{category}.json").exists()
        ):
            path = req.data_root / f"coco_pope_{category}.json"
        records = read_json_lines(req.annotation(path.name), req.task)
        if req.split == "train" and cap is not None and len(records) > cap:
            records = sample_limit(records, cap, req.seed)
        for rec in records:
            where = f"{req.task}: {path}: question {rec.get('question_id')!r}"
            answer = str(require(rec, "label", where)).strip().lower()
            if answer not in ("yes", "no"):
                raise req.error(
                    f"{path}: question {rec.get('question_id')!r}: label must be yes/no, got {answer!r}"
                )
            rows.append(
                {
                    "id": f"{category}/{require(rec, 'question_id', where)}",
                    "image": str(images / require(rec, "image", where)),
                    "question": require(rec, "text", where),
                    "label": int(answer == "yes"),
                    "category": category,
                }
            )
    return rows


TASK = Task(
    name="pope",
    description="POPE object hallucination: is the asked-about object in the image? (yes = 1)",
    kind="binary",
    splits=("train", "val", "test"),
    label_names=("no", "yes"),
    layout=LAYOUT,
    default_image_root="val2014 (train2014 for the train split)",
    load=load,
    options=(
        ("categories", "comma-separated subset of adversarial,popular,random (default: all)"),
        ("max_per_category", f"train split cap per category, seeded (default {TRAIN_CAP}; none = all)"),
    ),
)
