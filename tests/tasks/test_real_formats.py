"""The task adapters read a verbatim sample of the paper's own annotation files (tests/fixtures/lvlm-lp, committed,
so this runs on a fresh clone); every expected value is recomputed from the raw files here, not copied."""

from __future__ import annotations

import json
from pathlib import Path

from lvlmlp.tasks import get_task
from lvlmlp.tasks.mad import DECEPTIVE

FIXTURES = Path(__file__).parents[1] / "fixtures" / "lvlm-lp"


def test_pope_sample_rows_equal_the_raw_json_lines(tmp_path: Path) -> None:
    (tmp_path / "val2014").mkdir()
    rows = get_task("pope").rows(FIXTURES / "pope", tmp_path / "val2014", split="val")
    expected = []
    for cat in ("adversarial", "popular", "random"):
        for line in (FIXTURES / "pope" / f"coco_val_pope_{cat}.json").read_text().splitlines():
            rec = json.loads(line)
            expected.append((f"{cat}/{rec['question_id']}", str(tmp_path / "val2014" / rec["image"]), rec["text"],
                             {"yes": 1, "no": 0}[rec["label"]], cat))
    got = [(r["id"], r["image"], r["question"], r["label"], r["category"]) for r in rows]
    assert sorted(got) == sorted(expected) and len(got) == 72
    assert {r["label"] for r in rows} == {0, 1}  # both answers occur in the sample, so a yes/no swap is caught


def test_mad_sample_split_protocol_on_the_raw_arrays(tmp_path: Path) -> None:
    (tmp_path / "val2017").mkdir()
    mad = get_task("mad")
    train = mad.rows(FIXTURES / "madbench", tmp_path / "val2017", split="train")
    test = mad.rows(FIXTURES / "madbench", tmp_path / "val2017", split="test")
    raw = {c: json.loads((FIXTURES / "madbench" / f"{c}.json").read_text()) for c in ("Normal", *DECEPTIVE)}
    n_train = {c: 100 if c == "Normal" else 20 for c in raw}  # the paper: first 100 normal, first 20 per category
    for split, rows in (("train", train), ("test", test)):
        expected = sorted(
            (rec["Question(GPT)"], Path(rec["file"]).name, int(c == "Normal"))
            for c, items in raw.items() for i, rec in enumerate(items) if (i < n_train[c]) == (split == "train")
        )
        assert sorted((r["question"], Path(r["image"]).name, r["label"]) for r in rows) == expected
    assert len(train) == 200 and len(test) == sum(len(v) for v in raw.values()) - 200
    assert all(Path(r["image"]).parent == tmp_path / "val2017" for r in train + test)


def test_imagenet_label_names_in_index_order() -> None:
    names = json.loads((FIXTURES / "imagenet" / "imagenet-simple-labels.json").read_text())
    assert get_task("imagenet").label_names_at(FIXTURES / "imagenet") == tuple(names)
    assert len(names) == 1000 and names[:2] == ["tench", "goldfish"]
