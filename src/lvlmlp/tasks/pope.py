"""POPE object hallucination: "Is there a X in the image?" with the ground truth yes (1) / no (0)."""

from __future__ import annotations

from pathlib import Path

from lvlmlp.tasks.base import Request, Task, as_int, as_list, read_json_lines, require, sample_limit

CATEGORIES = ("adversarial", "popular", "random")
FIRST_N = 6000  # the original keeps the first 6,000 questions of each category file (dataset/POPE.py)

LAYOUT = """\
<data-root>/coco_{split}/coco_{split}_pope_{category}.json   the original code's layout (data/pope/ of its
    repository), JSON lines {"question_id", "image", "text", "label": "yes"|"no"}; also accepted flat:
<data-root>/coco_{split}_pope_{category}.json, and for val/test the POPE release's coco_pope_{category}.json
    category: adversarial, popular, random
<image-root>/{split}2014/COCO_{split}2014_000000310196.jpg ...  <image-root> is the COCO folder (default: the
    data root); a folder holding the images themselves is accepted too
splits: train = the coco_train files, val (and test) = the coco_val files; the first 6,000 rows of each category
options: categories (default all three, e.g. --task-option categories=adversarial,random);
    max_per_category (default 6000, the first N of each file; "none" keeps all); sample = first (default) |
    random (a seeded random N instead of the first N)
question: the text; the prompt adds "Answer the question using a single word or phrase." (one style, oe)
label: yes (1) / no (0); row id: CATEGORY/QUESTION_ID"""


def load(req: Request) -> list[dict]:
    categories = as_list(req.options.get("categories", list(CATEGORIES)), "categories", req.task)
    for c in categories:
        if c not in CATEGORIES:
            raise req.error(
                f"unknown category {c!r} in option categories (choose from {', '.join(CATEGORIES)})"
            )
    cap = as_int(req.options.get("max_per_category", FIRST_N), "max_per_category", req.task)
    sample = str(req.options.get("sample", "first"))
    if sample not in ("first", "random"):
        raise req.error(f"option sample must be first or random, got {sample!r}")
    coco_split = "train" if req.split == "train" else "val"
    images = _image_folder(req, coco_split)
    rows = []
    for category in categories:
        path = _annotation_file(req, category)
        records = read_json_lines(path, req.task)
        if cap is not None and len(records) > cap:
            records = records[:cap] if sample == "first" else sample_limit(records, cap, req.seed)
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
                    "question_id": rec["question_id"],
                }
            )
    return rows


def _annotation_file(req: Request, category: str) -> Path:
    split = "train" if req.split == "train" else req.split
    candidates = [Path(f"coco_{split}") / f"coco_{split}_pope_{category}.json", Path(f"coco_{split}_pope_{category}.json")]
    if req.split != "train":  # test reads the val files; the POPE release names them coco_pope_{category}.json
        candidates += [Path("coco_val") / f"coco_val_pope_{category}.json", Path(f"coco_val_pope_{category}.json"),
                       Path(f"coco_pope_{category}.json")]
    for rel in candidates:
        if (req.data_root / rel).is_file():
            return req.data_root / rel
    return req.annotation(candidates[0])  # raises, naming the original layout's path


def _image_folder(req: Request, coco_split: str) -> Path:
    root = req.image_root if req.image_root is not None else req.data_root
    if (root / f"{coco_split}2014").is_dir():
        return root / f"{coco_split}2014"
    if req.image_root is not None and root.is_dir():
        return root  # a folder of the images themselves
    raise req.error(f"image folder not found: {root / f'{coco_split}2014'} {req.see_layout}")


TASK = Task(
    name="pope",
    description="POPE object hallucination: is the asked-about object in the image? (yes = 1)",
    kind="binary",
    splits=("train", "val", "test"),
    label_names=("no", "yes"),
    layout=LAYOUT,
    default_image_root="{split}2014 (train2014 or val2014)",
    load=load,
    groups=(("category", "pope"),),  # POPE's accuracy / precision / recall / F1 / yes-ratio per category
    options=(
        ("categories", "comma-separated subset of adversarial,popular,random (default: all)"),
        ("max_per_category", f"rows kept per category file (default {FIRST_N}; none = all)"),
        ("sample", "first (default: the first N rows, as the original) or random (seeded)"),
    ),
)
