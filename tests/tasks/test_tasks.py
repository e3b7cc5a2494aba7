"""Task adapters: each reads a small tree in the benchmark's real layout and yields the expected rows."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from lvlmlp.cli import main
from lvlmlp.commands._args import add_task_arguments, task_rows_from_args
from lvlmlp.errors import LvlmlpError
from lvlmlp.tasks import get_task, list_tasks, prompt_styles, prompt_template
from lvlmlp.tasks.mad import DECEPTIVE
from lvlmlp.tasks.mathvista import check_answer, label_from_responses
from lvlmlp.tasks.mmsafety import UNSAFE_SCENARIOS
from tests.conftest import SHARED

FIXTURES = SHARED / "fixtures" / "lvlm-lp"


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 30, 30)).save(path)
    return path


def _json(path: Path, obj: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _json_lines(path: Path, objs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------- registry


def test_registry_names_and_unknown_task() -> None:
    assert [t.name for t in list_tasks()] == [
        "vizwiz",
        "mmsafety",
        "mad",
        "pope",
        "mathvista",
        "imagenet",
        "jsonl",
        "world-answerability",
        "world-safety",
        "world-deception",
        "world-uncertainty",
        "world-hallucination",
        "world-classification",
    ]
    with pytest.raises(LvlmlpError) as err:
        get_task("vqa")
    assert (
        str(err.value)
        == "unknown task 'vqa' (known: vizwiz, mmsafety, mad, pope, mathvista, imagenet, jsonl, world-answerability, "
        "world-safety, world-deception, world-uncertainty, world-hallucination, world-classification)"
    )


def test_prompt_templates() -> None:
    for task in list_tasks():
        assert prompt_template(task.name, "oe").startswith("{question}")
        assert prompt_template(task.name) == prompt_template(task.name, task.default_prompt_style)
        for style in ("oe", "oeh", "mq", "conf", "hard", "cot"):
            if style in prompt_styles(task.name):
                template = prompt_template(task.name, style)
                assert template.count("{question}") == 1
                assert template.replace("{question}", "").count("{") == 0  # plain substitution stays safe
    assert prompt_template("mathvista") == prompt_template("vizwiz", "oeh")  # what the original's scripts sent
    assert prompt_template("pope") == "{question}\nAnswer the question using a single word or phrase."
    assert prompt_styles("mad") == ("oe", "mq", "oeh") and prompt_styles("pope") == ("oe",)
    with pytest.raises(LvlmlpError, match=r"^task imagenet: unknown prompt style 'mq' \(styles: oe\)$"):
        prompt_template("imagenet", "mq")


def test_generic_checks(tmp_path: Path) -> None:
    task = get_task("mad")
    with pytest.raises(LvlmlpError, match=r"^mad: unknown split 'dev' \(splits: train, test; val = test\)$"):
        task.rows(tmp_path, split="dev")
    with pytest.raises(LvlmlpError, match=r"^mad: unknown option 'categories' \(options: none\)$"):
        task.rows(tmp_path, split="test", categories="x")
    with pytest.raises(LvlmlpError, match=r"^pope: per_class must be a positive integer, got 0$"):
        get_task("pope").rows(tmp_path, per_class=0)


# ------------------------------------------------------------------------------------------------- vizwiz


def _vizwiz_tree(root: Path) -> None:
    for split in ("train", "val", "test"):
        records = []
        for i in range(4):
            name = f"VizWiz_{split}_{i:08d}.jpg"
            _image(root / split / name)
            rec = {"image": name, "question": f"What is item {i}?", "answer_type": "other"}
            if split != "test":
                rec["answers"] = [{"answer": "unanswerable", "answer_confidence": "yes"}, {"answer": "soup"}]
                rec["answerable"] = i % 2
            records.append(rec)
        _json(root / "Annotations" / f"{split}.json", records)


def test_vizwiz_rows(tmp_path: Path) -> None:
    _vizwiz_tree(tmp_path)
    task = get_task("vizwiz")
    rows = task.rows(tmp_path, split="val")
    assert [r["id"] for r in rows] == [f"VizWiz_val_{i:08d}" for i in range(4)]
    assert [r["label"] for r in rows] == [0, 1, 0, 1]
    assert rows[1] == {
        "id": "VizWiz_val_00000001",
        "image": str(tmp_path.resolve() / "val" / "VizWiz_val_00000001.jpg"),
        "question": "What is item 1?",
        "answer_type": "other",
        "answers": ["unanswerable", "soup"],
        "label": 1,
        "split": "val",
    }
    assert all(Path(r["image"]).is_file() for r in rows)
    test = task.rows(tmp_path, split="test")
    assert len(test) == 4 and all("label" not in r for r in test)  # unlabelled, still extractable
    assert task.rows(tmp_path) == rows  # the default split is val


def test_vizwiz_missing_files_name_the_expected_path(tmp_path: Path) -> None:
    task = get_task("vizwiz")
    expected = tmp_path.resolve() / "Annotations" / "train.json"
    with pytest.raises(LvlmlpError) as err:
        task.rows(tmp_path, split="train")
    assert (
        str(err.value)
        == f"vizwiz: annotations not found: {expected} (expected layout: `lvlmlp tasks vizwiz`)"
    )
    _json(expected, [{"image": "a.jpg", "question": "q?"}])
    with pytest.raises(LvlmlpError, match=r"image folder not found: .*train \(default <data-root>/train\)"):
        task.rows(tmp_path, split="train")
    with pytest.raises(LvlmlpError, match=r"image folder not found: .*elsewhere \(--image-root\)"):
        task.rows(tmp_path, tmp_path / "elsewhere", split="train")


# ------------------------------------------------------------------------------------------------- mmsafety
# The split protocol is compared with a port of the original code in tests/test_paper_protocol.py.


def test_mmsafety_missing_file_and_field(tmp_path: Path) -> None:
    task = get_task("mmsafety")
    with pytest.raises(
        LvlmlpError, match=r"annotations not found: .*data/processed_questions/01-Illegal_Activitiy.json \(expected"
    ):
        task.rows(tmp_path)
    for scenario in UNSAFE_SCENARIOS:
        _json(tmp_path / "data" / "processed_questions" / f"{scenario}.json", {"0": {"Rephrased Question": "q"}})
    with pytest.raises(LvlmlpError, match=r"01-Illegal_Activitiy.json: item '0': missing field 'Key Phrase'$"):
        task.rows(tmp_path, split="train")
    with pytest.raises(LvlmlpError, match=r"^mmsafety: unknown image_variant 'SDXL' \(choose from SD_TYPO, SD, TYPO\)$"):
        task.rows(tmp_path, image_variant="SDXL")


# ------------------------------------------------------------------------------------------------- mad


def _mad_tree(root: Path, n_normal: int = 102, n_deceptive: int = 21) -> None:
    for c_index, category in enumerate(("Normal", *DECEPTIVE)):
        n = n_normal if category == "Normal" else n_deceptive
        records = [
            {
                "image_id": 1000 * c_index + i,
                "file": f"/data/someone/coco/val2017/{1000 * c_index + i:012d}.jpg",
                "caption": ["a caption"],
                "Question(GPT)": f"{category} question {i}?",
            }
            for i in range(n)
        ]
        _json(root / f"{category}.json", records)
    (root / "val2017").mkdir()


def test_mad_rows(tmp_path: Path) -> None:
    _mad_tree(tmp_path)
    task = get_task("mad")
    train = task.rows(tmp_path, split="train")
    test = task.rows(tmp_path, split="test")
    assert len(train) == 200 and Counter(r["label"] for r in train) == {1: 100, 0: 100}
    assert Counter(r["category"] for r in train)["SpatialRelationship"] == 20
    assert [r["id"] for r in test] == [
        "Normal/100",
        "Normal/101",
        "CountOfObject/20",
        "NonexistentObject/20",
        "ObjectAttribute/20",
        "SceneUnderstanding/20",
        "SpatialRelationship/20",
    ]
    assert test[2] == {
        "id": "CountOfObject/20",
        "image": str(tmp_path.resolve() / "val2017" / "000000001020.jpg"),  # by file name, not the old path
        "question": "CountOfObject question 20?",
        "label": 0,
        "category": "CountOfObject",
        "image_id": 1020,
        "split": "test",
    }


def test_mad_missing_category_file(tmp_path: Path) -> None:
    _mad_tree(tmp_path)
    (tmp_path / "ObjectAttribute.json").unlink()
    with pytest.raises(
        LvlmlpError, match=r"^mad: annotations not found: .*/ObjectAttribute.json \(expected layout"
    ):
        get_task("mad").rows(tmp_path)


# ------------------------------------------------------------------------------------------------- pope


def _pope_records(n: int) -> list[dict]:
    return [
        {"question_id": i + 1, "image": f"COCO_val2014_{i // 2:012d}.jpg", "text": f"Is there a thing {i}?",
         "label": "yes" if i % 2 == 0 else "no"}
        for i in range(n)
    ]  # fmt: skip


def test_pope_rows_and_options(tmp_path: Path) -> None:
    for category in ("adversarial", "popular", "random"):
        _json_lines(tmp_path / f"coco_pope_{category}.json", _pope_records(4))  # the original release names
    _json_lines(tmp_path / "coco_train_pope_random.json", _pope_records(10))
    (tmp_path / "val2014").mkdir()
    (tmp_path / "train2014").mkdir()
    task = get_task("pope")
    rows = task.rows(tmp_path, split="test")
    assert len(rows) == 12 and [r["label"] for r in rows[:4]] == [1, 0, 1, 0]
    assert rows[5] == {
        "id": "popular/2",
        "image": str(tmp_path.resolve() / "val2014" / "COCO_val2014_000000000000.jpg"),
        "question": "Is there a thing 1?",
        "label": 0,
        "category": "popular",
        "question_id": 2,
        "split": "test",
    }
    assert [r["id"] for r in task.rows(tmp_path, split="val", categories="random,adversarial")][::4] == [
        "random/1",
        "adversarial/1",
    ]
    first = task.rows(tmp_path, split="train", categories=["random"], max_per_category=4)
    assert [r["id"] for r in first] == ["random/1", "random/2", "random/3", "random/4"]  # the original: first N
    capped = task.rows(tmp_path, split="train", categories=["random"], max_per_category=4, seed=3, sample="random")
    assert len(capped) == 4 and capped != first and capped == task.rows(
        tmp_path, split="train", categories=["random"], max_per_category=4, seed=3, sample="random"
    )
    assert capped[0]["image"].startswith(str(tmp_path.resolve() / "train2014"))
    ids = [int(r["id"].split("/")[1]) for r in capped]
    assert ids == sorted(ids)  # sampled rows keep file order
    assert len(task.rows(tmp_path, split="train", categories="random", max_per_category="none")) == 10
    with pytest.raises(LvlmlpError, match=r"^pope: unknown category 'rare' in option categories"):
        task.rows(tmp_path, categories="rare")
    with pytest.raises(LvlmlpError, match=r"annotations not found: .*/coco_train_pope_popular.json"):
        task.rows(tmp_path, split="train", categories="popular")


def test_pope_bad_label(tmp_path: Path) -> None:
    _json_lines(
        tmp_path / "coco_val_pope_random.json",
        [{"question_id": 7, "image": "a.jpg", "text": "Is?", "label": "maybe"}],
    )
    (tmp_path / "val2014").mkdir()
    with pytest.raises(
        LvlmlpError, match=r"coco_val_pope_random.json: question 7: label must be yes/no, got 'maybe'$"
    ):
        get_task("pope").rows(tmp_path, split="val", categories="random")


# ------------------------------------------------------------------------------------------------- mathvista

MATHVISTA = {
    "1": {"pid": "1", "image": "images/1.jpg", "question": "q", "query": "Hint: pick one.\nWhich is larger?",
          "answer": "5", "question_type": "multi_choice", "answer_type": "text", "choices": ["3", "5", "8"],
          "precision": None, "unit": None},
    "2": {"pid": "2", "image": "images/2.jpg", "query": "How long is it?", "answer": "1.45",
          "question_type": "free_form", "answer_type": "float", "choices": None, "precision": 2.0, "unit": "cm"},
}  # fmt: skip


def test_mathvista_rows(tmp_path: Path) -> None:
    _json(tmp_path / "testmini.json", MATHVISTA)
    task = get_task("mathvista")
    assert task.needs_generation and task.kind == "binary-from-response"
    rows = task.rows(tmp_path)
    assert rows[0] == {
        "id": "1",
        "image": str(tmp_path.resolve() / "images" / "1.jpg"),
        "question": "Hint: pick one.\nWhich is larger?",
        "answer": "5",
        "question_type": "multi_choice",
        "answer_type": "text",
        "choices": ["3", "5", "8"],
        "precision": None,
        "unit": None,
        "split": "testmini",
    }
    assert rows[1]["precision"] == 2.0 and rows[1]["unit"] == "cm" and "label" not in rows[1]
    # A list of records, given as the file itself, works the same.
    listed = _json(tmp_path / "other" / "mini.json", list(MATHVISTA.values()))
    assert [r["id"] for r in task.rows(listed)] == ["1", "2"]
    assert task.rows(listed)[0]["image"] == str(listed.parent.resolve() / "images" / "1.jpg")
    with pytest.raises(LvlmlpError, match=r"^mathvista: annotations not found: .*/empty/testmini.json"):
        task.rows(tmp_path / "empty")


def test_mathvista_parquet_release_gives_the_json_rows(tmp_path: Path) -> None:
    """The Hugging Face release (data/testmini-*.parquet, with a decoded_image column and NaN precisions) gives the
    same rows as the JSON annotations."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    _json(tmp_path / "json" / "testmini.json", MATHVISTA)
    records = list(MATHVISTA.values())
    table = pa.table({
        **{k: [r[k] for r in records] for k in ("pid", "image", "query", "answer", "question_type", "answer_type",
                                                "choices", "unit")},
        "precision": [float("nan") if r["precision"] is None else r["precision"] for r in records],
        "decoded_image": [b"\x89PNG..." for _ in records],  # left unread
    })
    (tmp_path / "hf" / "data").mkdir(parents=True)
    pq.write_table(table, tmp_path / "hf" / "data" / "testmini-00000-of-00001.parquet")
    task = get_task("mathvista")
    from_json, from_parquet = task.rows(tmp_path / "json"), task.rows(tmp_path / "hf")
    for a, b in zip(from_json, from_parquet):
        assert {**a, "image": None} == {**b, "image": None}
        assert Path(a["image"]).relative_to(tmp_path / "json") == Path(b["image"]).relative_to(tmp_path / "hf")
    json.dumps(from_parquet)  # plain JSON types for the run's metadata


def test_mathvista_parquet_needs_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "testmini-00000-of-00001.parquet").write_bytes(b"PAR1")
    with pytest.raises(
        LvlmlpError, match=r"needs pyarrow \(pip install pyarrow\), or pass the JSON annotation file$"
    ):
        get_task("mathvista").rows(tmp_path)


MC = {"answer": "5", "question_type": "multi_choice", "answer_type": "text", "choices": ["3", "5", "8"]}
MC_TEXT = {
    "answer": "a cat",
    "question_type": "multi_choice",
    "answer_type": "text",
    "choices": ["a dog", "a cat"],
}
INT = {"answer": "1200", "question_type": "free_form", "answer_type": "integer"}
FLOAT = {"answer": "1.45", "question_type": "free_form", "answer_type": "float", "precision": 2.0}
FLOAT1 = {"answer": "0.6", "question_type": "free_form", "answer_type": "float", "precision": 1.0}
FLOAT_NOPREC = {"answer": "2.5", "question_type": "free_form", "answer_type": "float", "precision": None}
LIST = {"answer": "[2007, 2008]", "question_type": "free_form", "answer_type": "list"}
TEXT = {"answer": "Yes", "question_type": "free_form", "answer_type": "text"}


@pytest.mark.parametrize(
    ("response", "row", "correct"),
    [
        ("B", MC, True),
        ("(B)", MC, True),
        ("B. 5", MC, True),
        ("The answer is B.", MC, True),
        ("5", MC, True),
        ("A", MC, False),
        ("D", MC, False),  # no fourth option
        ("It is 5, clearly.", MC, True),  # the one option text in the sentence
        ("3 or 5", MC, False),  # two options named: ambiguous
        ("a cat", MC_TEXT, True),
        ("A cat.", MC_TEXT, True),  # the option text wins over reading "A" as a letter
        ("A", MC_TEXT, False),
        ("1200", INT, True),
        ("1,200 people", INT, True),
        ("Answer: 1200.0", INT, True),
        ("120", INT, False),
        ("1.45", FLOAT, True),
        ("1.449 cm", FLOAT, True),  # rounded to 2 decimals
        ("1.46", FLOAT, False),
        ("0.62", FLOAT1, True),
        ("0.66", FLOAT1, False),
        ("2.5", FLOAT_NOPREC, True),
        ("2.54", FLOAT_NOPREC, True),  # the answer's own decimals: 1
        ("[2007, 2008]", LIST, True),
        ("2007 and 2008", LIST, True),
        ("[2008, 2007]", LIST, False),
        ("[2007]", LIST, False),
        ("yes", TEXT, True),
        (" Yes. ", TEXT, True),
        ("no", TEXT, False),
        ("", TEXT, False),
        ("I don't know", INT, False),
    ],
)
def test_mathvista_checker(response: str, row: dict, correct: bool) -> None:
    assert check_answer(response, row) is correct


def test_mathvista_labels_from_responses() -> None:
    meta = [
        {"id": "1", "response": "B", **MC},
        {"id": "2", "response": "7", **INT},
        {"id": "3", "response": "1.45", **FLOAT},
    ]
    assert label_from_responses(meta) == [1, 0, 1]
    with pytest.raises(LvlmlpError, match=r"^mathvista: row '9' has no response; extract with generation"):
        label_from_responses([{"id": "9", **INT}])


# ------------------------------------------------------------------------------------------------- imagenet

WNIDS = {"n01440764": 0, "n01443537": 1, "n01484850": 2}


def _imagenet_tree(root: Path) -> None:
    _json(root / "ImageNet2012_wnid_to_idx.json", WNIDS)
    _json(root / "imagenet-simple-labels.json", ["tench", "goldfish", "great white shark"])
    for wnid in WNIDS:
        for i in range(5):
            _image(root / "train" / wnid / f"{wnid}_{i}.JPEG")
    for i in range(6):
        _image(root / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG")


def test_imagenet_train_per_class(tmp_path: Path) -> None:
    _imagenet_tree(tmp_path)
    task = get_task("imagenet")
    rows = task.rows(tmp_path, split="train", per_class=2, seed=0)
    assert Counter(r["label"] for r in rows) == {0: 2, 1: 2, 2: 2}
    assert rows == task.rows(tmp_path, split="train", per_class=2, seed=0)  # seeded
    assert {r["id"] for r in rows} != {
        r["id"] for r in task.rows(tmp_path, split="train", per_class=2, seed=1)
    }
    row = rows[0]
    assert row["question"] == "Give me a one-word label for the foreground object in this image."
    assert (row["wnid"], row["class_name"], row["split"]) == ("n01440764", "tench", "train")
    assert row["image"].startswith(str(tmp_path.resolve() / "train" / "n01440764" / "n01440764_"))
    assert len(task.rows(tmp_path, split="train")) == 15
    first = task.rows(tmp_path, split="train", per_class=2, seed=None)
    assert [r["id"] for r in first][:2] == ["n01440764_0", "n01440764_1"] and len(first) == 6
    assert task.label_names_at(tmp_path) == ("tench", "goldfish", "great white shark")


def test_imagenet_flat_val_label_files(tmp_path: Path) -> None:
    _imagenet_tree(tmp_path)
    task = get_task("imagenet")
    with pytest.raises(
        LvlmlpError, match=r"has no WNID folders and no label file \(LOC_val_solution.csv or val_labels.txt\)"
    ):
        task.rows(tmp_path, split="val")
    lines = [f"ILSVRC2012_val_{i + 1:08d}.JPEG {i % 3}" for i in range(3)]
    lines += [f"ILSVRC2012_val_{i + 1:08d}.JPEG {list(WNIDS)[i % 3]}" for i in range(3, 6)]
    (tmp_path / "val_labels.txt").write_text("\n".join(lines) + "\n")
    rows = task.rows(tmp_path, split="val")
    assert {r["id"]: r["label"] for r in rows} == {f"ILSVRC2012_val_{i + 1:08d}": i % 3 for i in range(6)}
    (tmp_path / "val_labels.txt").unlink()
    csv_lines = ["ImageId,PredictionString"]
    csv_lines += [f"ILSVRC2012_val_{i + 1:08d},{list(WNIDS)[2 - i % 3]} 1 2 3 4" for i in range(6)]
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(csv_lines) + "\n")
    rows = task.rows(tmp_path, split="val")
    assert [r["label"] for r in rows] == [2, 1, 0, 2, 1, 0]  # a flat folder keeps its file order
    assert rows[0]["id"] == "ILSVRC2012_val_00000001" and rows[0]["class_name"] == "great white shark"


def test_imagenet_missing_map(tmp_path: Path) -> None:
    with pytest.raises(
        LvlmlpError, match=r"^imagenet: annotations not found: .*/ImageNet2012_wnid_to_idx.json"
    ):
        get_task("imagenet").rows(tmp_path)


# ------------------------------------------------------------------------------------------------- jsonl and sampling


def _manifest(path: Path, n: int) -> Path:
    return _json_lines(
        path,
        [{"id": f"r{i}", "image": f"img/{i}.png", "question": "q?", "label": i % 2, "split": ["train", "test"][i % 2]}
         for i in range(n)],
    )  # fmt: skip


def test_jsonl_file_and_folder(tmp_path: Path) -> None:
    task = get_task("jsonl")
    manifest = _manifest(tmp_path / "m.jsonl", 6)
    assert len(task.rows(manifest)) == 6  # default split "all"
    test = task.rows(manifest, split="test")
    assert [r["id"] for r in test] == ["r1", "r3", "r5"]
    assert test[0]["image"] == str(tmp_path.resolve() / "img" / "1.png")
    _json_lines(tmp_path / "d" / "val.jsonl", [{"id": "a", "image": "x.png", "question": "q?"}])
    assert task.rows(tmp_path / "d", split="val")[0]["split"] == "val"


def test_sampling_limit_and_per_class(tmp_path: Path) -> None:
    task = get_task("jsonl")
    manifest = _manifest(tmp_path / "m.jsonl", 20)
    first = task.rows(manifest, limit=5, seed=None)
    assert [r["id"] for r in first] == ["r0", "r1", "r2", "r3", "r4"]
    sampled = task.rows(manifest, limit=5, seed=7)
    assert sampled == task.rows(manifest, limit=5, seed=7) and sampled != first
    assert [int(r["id"][1:]) for r in sampled] == sorted(int(r["id"][1:]) for r in sampled)
    balanced = task.rows(manifest, per_class=3, seed=0)
    assert Counter(r["label"] for r in balanced) == {0: 3, 1: 3}
    _json_lines(tmp_path / "u.jsonl", [{"id": "a", "image": "x.png", "question": "q?"}])
    with pytest.raises(
        LvlmlpError, match=r"^jsonl split all: per-class sampling needs labels, row 'a' has none$"
    ):
        task.rows(tmp_path / "u.jsonl", per_class=2)


# ------------------------------------------------------------------------------------------------- command line


def test_cli_tasks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 13 and out[3].startswith("pope ") and "(yes = 1)" in out[3]  # 7 benchmarks, 6 world analogues
    assert main(["tasks", "pope"]) == 0
    out = capsys.readouterr().out
    assert "labels: 0 = no, 1 = yes" in out and "splits: train, val, test (default test)" in out
    assert "prompt styles: oe (default oe)" in out and "coco_{split}/coco_{split}_pope_{category}.json" in out
    assert main(["tasks", "nope"]) == 2
    assert "lvlmlp: error: unknown task 'nope'" in capsys.readouterr().err


def test_task_rows_from_args(tmp_path: Path) -> None:
    _json_lines(tmp_path / "coco_val_pope_random.json", _pope_records(4))
    _json_lines(tmp_path / "coco_val_pope_popular.json", _pope_records(4))
    (tmp_path / "images").mkdir()
    parser = argparse.ArgumentParser()
    add_task_arguments(parser)
    args = parser.parse_args(
        ["--task", "pope", "--data-root", str(tmp_path), "--image-root", str(tmp_path / "images"), "--split", "val",
         "--task-option", "categories=popular", "--prompt-style", "oe", "--per-class", "1", "--seed", "2"]
    )  # fmt: skip
    rows, template = task_rows_from_args(args)
    assert [r["category"] for r in rows] == ["popular", "popular"] and sorted(r["label"] for r in rows) == [
        0,
        1,
    ]
    assert template == prompt_template("pope", "oe")
    assert rows[0]["image"].startswith(str(tmp_path.resolve() / "images"))
    args = parser.parse_args(["--task", "pope", "--data-root", str(tmp_path), "--task-option", "image_variant=SD"])
    with pytest.raises(LvlmlpError, match=r"^pope: unknown option 'image_variant' \(options: categories, max_per_category, sample\)$"):
        task_rows_from_args(args)
    with pytest.raises(LvlmlpError, match=r"^--task-option 'categories': expected KEY=VALUE$"):
        task_rows_from_args(
            parser.parse_args(["--task", "pope", "--data-root", "x", "--task-option", "categories"])
        )
    with pytest.raises(LvlmlpError, match=r"^--data-root is required with --task pope"):
        task_rows_from_args(parser.parse_args(["--task", "pope"]))


# ------------------------------------------------------------------------------------------------- real files


@pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"paper annotation fixtures absent: {FIXTURES}")
def test_real_pope_and_mad_annotation_files(tmp_path: Path) -> None:
    # The adapters only need the image folders to exist; single images are checked by the extractor.
    (tmp_path / "val2014").mkdir()
    (tmp_path / "val2017").mkdir()
    pope = get_task("pope").rows(FIXTURES / "pope", tmp_path / "val2014", split="val")
    assert len(pope) == 9000
    assert Counter(r["category"] for r in pope) == {"adversarial": 3000, "popular": 3000, "random": 3000}
    assert Counter(r["label"] for r in pope) == {1: 4500, 0: 4500}
    mad = get_task("mad")
    train = mad.rows(FIXTURES / "madbench", tmp_path / "val2017", split="train")
    test = mad.rows(FIXTURES / "madbench", tmp_path / "val2017", split="test")
    assert (len(train), len(test)) == (200, 1800)
    assert Counter(r["label"] for r in test) == {1: 900, 0: 900}
    assert all(Path(r["image"]).parent == tmp_path / "val2017" for r in test)
    assert get_task("imagenet").label_names_at(FIXTURES / "imagenet")[:2] == ("tench", "goldfish")


# The task adapters read a verbatim sample of the paper's own annotation files (tests/fixtures/lvlm-lp, committed,
# so this runs on a fresh clone); every expected value is recomputed from the raw files here, not copied.

SAMPLES = Path(__file__).parents[1] / "fixtures" / "lvlm-lp"


def test_pope_sample_rows_equal_the_raw_json_lines(tmp_path: Path) -> None:
    (tmp_path / "val2014").mkdir()
    rows = get_task("pope").rows(SAMPLES / "pope", tmp_path / "val2014", split="val")
    expected = []
    for cat in ("adversarial", "popular", "random"):
        for line in (SAMPLES / "pope" / f"coco_val_pope_{cat}.json").read_text().splitlines():
            rec = json.loads(line)
            expected.append((f"{cat}/{rec['question_id']}", str(tmp_path / "val2014" / rec["image"]), rec["text"],
                             {"yes": 1, "no": 0}[rec["label"]], cat))
    got = [(r["id"], r["image"], r["question"], r["label"], r["category"]) for r in rows]
    assert sorted(got) == sorted(expected) and len(got) == 72
    assert {r["label"] for r in rows} == {0, 1}  # both answers occur in the sample, so a yes/no swap is caught


def test_mad_sample_split_protocol_on_the_raw_arrays(tmp_path: Path) -> None:
    (tmp_path / "val2017").mkdir()
    mad = get_task("mad")
    train = mad.rows(SAMPLES / "madbench", tmp_path / "val2017", split="train")
    test = mad.rows(SAMPLES / "madbench", tmp_path / "val2017", split="test")
    raw = {c: json.loads((SAMPLES / "madbench" / f"{c}.json").read_text()) for c in ("Normal", *DECEPTIVE)}
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
    names = json.loads((SAMPLES / "imagenet" / "imagenet-simple-labels.json").read_text())
    assert get_task("imagenet").label_names_at(SAMPLES / "imagenet") == tuple(names)
    assert len(names) == 1000 and names[:2] == ["tench", "goldfish"]
