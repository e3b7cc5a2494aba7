"""ImageNet-1k classification through one fixed question; the probe predicts the class index (multiclass).

The original trains on 16 random images per class (`per_class=16`, seeded here); sampling happens on file names before rows are built,
so a 1.28M-image train folder costs one directory listing, not a million dicts.
"""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass
from pathlib import Path

from lvlmlp.tasks.base import Request, Task, as_int, read_json

QUESTION = "Give me a one-word label for the foreground object in this image."  # dataset/ImageNet.py
WNID_MAP = "ImageNet2012_wnid_to_idx.json"
NAMES = "imagenet-simple-labels.json"
VAL_LABEL_FILES = ("LOC_val_solution.csv", "val_labels.txt")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")

LAYOUT = f"""\
<data-root>/{WNID_MAP}        required: {{"n01440764": 0, ...}} WNID -> class index
<data-root>/{NAMES}           optional: a JSON list of readable class names in index order
<image-root>/train/WNID/*.JPEG
<image-root>/val/WNID/*.JPEG     or flat val/*.JPEG with one of these label files in <data-root>:
    LOC_val_solution.csv  the Kaggle file: ImageId,PredictionString (its first word is the WNID)
    val_labels.txt        lines "FILENAME WNID" or "FILENAME INDEX"
default <image-root>: the data root
question: "{QUESTION}"
per_class: K seeded images per class; option train_per_class=K: only in the train split (the original: 16
    random, unseeded, for train and the whole val set for test); labels: the class index; row id: file stem"""


def load(req: Request) -> list[dict]:
    wnid_to_idx = _wnid_map(req)
    names = _names(req.data_root)
    split_dir = req.images(".") / req.split
    if not split_dir.is_dir():
        raise req.error(f"image folder not found: {split_dir} {req.see_layout}")
    class_dirs = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    flat = not class_dirs
    if not flat:
        files = {wnid: _image_files(split_dir / wnid) for wnid in class_dirs}
        for wnid in class_dirs:
            if wnid not in wnid_to_idx:
                raise req.error(f"{split_dir / wnid}: WNID folder not in {req.data_root / WNID_MAP}")
    else:
        files = _flat_by_wnid(req, split_dir, wnid_to_idx)
    per_class = req.per_class
    if req.split == "train" and req.options.get("train_per_class") is not None:
        per_class = as_int(req.options["train_per_class"], "train_per_class", req.task)
    if per_class is not None:
        k, rng = per_class, random.Random(req.seed)  # seed None: the first K files, like Task.rows
        files = {
            w: fs if len(fs) <= k else (fs[:k] if req.seed is None else sorted(rng.sample(fs, k)))
            for w, fs in files.items()
        }
    rows = []
    for wnid in sorted(files, key=wnid_to_idx.__getitem__):
        label = wnid_to_idx[wnid]
        for path in files[wnid]:
            row = {"id": path.stem, "image": str(path), "question": QUESTION, "label": label, "wnid": wnid}
            if names is not None:
                row["class_name"] = names[label]
            rows.append(row)
    if flat:  # a flat folder keeps its file order (ILSVRC2012_val_00000001 first), as the benchmark lists it
        rows.sort(key=lambda r: r["image"])
    return rows


def _wnid_map(req: Request) -> dict[str, int]:
    path = req.annotation(WNID_MAP)
    mapping = read_json(path, req.task)
    if not isinstance(mapping, dict) or not all(isinstance(v, int) for v in mapping.values()):
        raise req.error(f"{path}: expected a JSON object WNID -> integer index")
    return mapping


def _names(data_root: Path) -> list[str] | None:
    path = data_root / NAMES
    return [str(n) for n in read_json(path, "imagenet")] if path.is_file() else None


def _image_files(folder: Path) -> list[Path]:
    return sorted(folder / e.name for e in os.scandir(folder) if e.name.lower().endswith(IMAGE_SUFFIXES))


def _flat_by_wnid(req: Request, split_dir: Path, wnid_to_idx: dict[str, int]) -> dict[str, list[Path]]:
    """Group a flat folder of images by the WNID its label file gives each file stem."""
    label_file = next((req.data_root / n for n in VAL_LABEL_FILES if (req.data_root / n).is_file()), None)
    if label_file is None:
        raise req.error(
            f"{split_dir} has no WNID folders and no label file ({' or '.join(VAL_LABEL_FILES)}) in "
            f"{req.data_root} {req.see_layout}"
        )
    idx_to_wnid = {v: k for k, v in wnid_to_idx.items()}
    stem_to_wnid: dict[str, str] = {}
    with label_file.open(encoding="utf-8", newline="") as f:
        if label_file.suffix == ".csv":
            for rec in csv.DictReader(f):
                stem_to_wnid[rec["ImageId"]] = rec["PredictionString"].split()[0]
        else:
            for lineno, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2:
                    raise req.error(f"{label_file}:{lineno}: expected 'FILENAME WNID' or 'FILENAME INDEX'")
                name, cls = parts
                stem_to_wnid[Path(name).stem] = idx_to_wnid.get(int(cls), cls) if cls.isdigit() else cls
    grouped: dict[str, list[Path]] = {}
    for path in _image_files(split_dir):
        wnid = stem_to_wnid.get(path.stem)
        if wnid is None:
            raise req.error(f"{path.name}: no label in {label_file}")
        if wnid not in wnid_to_idx:
            raise req.error(
                f"{label_file}: class {wnid!r} of {path.name} is not in {req.data_root / WNID_MAP}"
            )
        grouped.setdefault(wnid, []).append(path)
    return grouped


@dataclass(frozen=True)
class ImageNetTask(Task):
    """The class names live in the data root, so `label_names` is read from there."""

    def label_names_at(self, data_root: str | Path) -> tuple[str, ...]:
        root = Path(data_root)
        names = _names(root)
        if names is not None:
            return tuple(names)
        mapping = read_json(root / WNID_MAP, self.name) if (root / WNID_MAP).is_file() else {}
        return tuple(sorted(mapping, key=mapping.__getitem__))  # WNIDs, in index order


TASK = ImageNetTask(
    name="imagenet",
    description="ImageNet-1k: which of the 1,000 classes is the main object? (multiclass, the class index)",
    kind="multiclass",
    samples_per_class=True,
    splits=("train", "val"),
    label_names=(),
    layout=LAYOUT,
    default_image_root=".",
    load=load,
    default_split="val",
    options=(("train_per_class", "K seeded images per class in the train split only (the original: 16)"),),
)
