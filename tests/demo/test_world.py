"""The procedural world: deterministic for a seed, and every label checked against the rendered pixels by rules
that do not use the generator's own bookkeeping (connected components of saturated pixels, their mean colour,
and their silhouette)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from lvlmlp.data import read_manifest
from lvlmlp.demo import world as W

N = 48  # rows per split: enough to cover every category / degradation several times, fast to render


# ----------------------------------------------------------------------------- an independent pixel reader
def _shape_of(m: np.ndarray) -> str:
    """Name a silhouette (bool mask cropped to its box) from its geometry alone."""
    h, w = m.shape
    fill = m.mean()
    corners_empty = not (m[0, 0] or m[0, -1] or m[-1, 0] or m[-1, -1])
    if fill > 0.95:
        return "square"
    if m[-1].all() and m[0].sum() <= 3:
        return "triangle"
    if corners_empty and m[h // 2].all() and m[:, w // 2].all() and fill < 0.7:
        return "cross"
    if fill > 0.7:
        return "circle"
    return "star"


def _objects(path: str | Path) -> list[tuple[str, str]]:
    """(colour, shape) of every saturated blob in an image, by nearest palette colour and silhouette."""
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    saturated = img.max(-1) - img.min(-1) > 60  # background, text and degraded pixels are all near-grey
    labels, n = ndimage.label(saturated)
    palette = np.array(list(W.COLORS.values()))
    found = []
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        blob = labels[box] == k
        mean = img[box][blob].mean(0)
        color = W.COLOR_NAMES[int(np.argmin(((palette - mean) ** 2).sum(-1)))]
        found.append((color, _shape_of(blob)))
    return found


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    root = tmp_path_factory.mktemp("world")
    return {t: read_manifest(W.write_task(t, root, n_train=N, n_test=N, seed=3)) for t in W.TASKS}


# ------------------------------------------------------------------------------------------ determinism
def test_same_seed_same_bytes_and_rows_do_not_depend_on_n(tmp_path: Path) -> None:
    for task in W.TASKS:
        a = W.task_rows(task, tmp_path / "a" / task, n_train=4, n_test=3, seed=7)
        b = W.task_rows(task, tmp_path / "b" / task, n_train=6, n_test=3, seed=7)
        c = W.task_rows(task, tmp_path / "c" / task, n_train=4, n_test=3, seed=8)
        b = [r for r in b if r["split"] == "test" or int(r["id"][-5:]) < 4]
        assert [{**r, "image": 0} for r in a] == [{**r, "image": 0} for r in b]
        assert all(Path(x["image"]).read_bytes() == Path(y["image"]).read_bytes() for x, y in zip(a, b))
        assert any(Path(x["image"]).read_bytes() != Path(y["image"]).read_bytes() for x, y in zip(a, c))


def test_train_and_test_scenes_differ(rows: dict[str, list[dict]]) -> None:
    for task, rs in rows.items():
        by_split = {s: {Path(r["image"]).read_bytes() for r in rs if r["split"] == s} for s in ("train", "test")}
        assert not by_split["train"] & by_split["test"], task


# --------------------------------------------------------------------------------------------- formats
def test_rows_follow_the_manifest_contract(rows: dict[str, list[dict]], tmp_path: Path) -> None:
    for task, rs in rows.items():
        assert len({r["id"] for r in rs}) == len(rs) == 2 * N
        assert {r["split"] for r in rs} == {"train", "test"}
        for r in rs:
            assert Path(r["image"]).is_file() and r["question"]
            assert Image.open(r["image"]).size == (W.IMAGE_SIZE, W.IMAGE_SIZE)
            if task == "uncertainty":
                assert "label" not in r and 1 <= int(r["answer"]) <= W.MAX_COUNT
            else:
                assert isinstance(r["label"], int)
        if task not in ("uncertainty", "classification"):
            assert sum(r["label"] for r in rs) == N  # binary tasks are balanced
    # manifests store image paths relative to their folder, so a copied folder still works
    moved = tmp_path / "moved"
    W.write_task("hallucination", moved, n_train=2, n_test=1)
    lines = (moved / "hallucination.jsonl").read_text().splitlines()
    assert all('"image": "images/hallucination/' in line for line in lines)


def test_vocabulary_covers_every_question_and_answer(rows: dict[str, list[dict]]) -> None:
    vocab = W.vocabulary()
    texts = [r["question"] for rs in rows.values() for r in rs]
    texts += [str(r["answer"]) for rs in rows.values() for r in rs if "answer" in r]
    texts += W.CLASS_NAMES + [W.A_REFUSAL, W.A_UNANSWERABLE, W.A_COMPLY]
    missing = {w for t in texts for w in W._words(t)} - vocab
    assert not missing


# --------------------------------------------------------------------------------------------- labels
def test_scene_masks_are_painted_with_the_stated_colour() -> None:
    palette = {c: np.array(v) for c, v in W.COLORS.items()}
    for i in range(20):
        scene, _ = W.task_scene("hallucination", "train", i)
        img = np.asarray(scene.render()).astype(int)
        union = np.zeros(img.shape[:2], int)
        for o in scene.objects:
            union += o.mask
            pix = img[o.mask]
            assert (pix == o.rgb).all()
            dists = {c: np.abs(pix.mean(0) - v).sum() for c, v in palette.items()}
            assert min(dists, key=dists.get) == o.color
        assert union.max() == 1  # objects never overlap


def test_classification_labels_match_pixels(rows: dict[str, list[dict]]) -> None:
    assert len(W.CLASS_NAMES) >= 20
    for r in rows["classification"]:
        assert _objects(r["image"]) == [tuple(W.CLASS_NAMES[r["label"]].split())]


def test_hallucination_labels_match_pixels(rows: dict[str, list[dict]]) -> None:
    cats = set()
    for r in rows["hallucination"]:
        words = r["question"].rstrip("?").split()
        color, shape = words[3], words[4]
        found = _objects(r["image"])
        assert r["label"] == int((color, shape) in found), r["id"]
        assert len(found) == len(r["objects"])
        cats.add(r["category"])
        if r["label"] == 0 and r["category"] == "adversarial":  # a confusable: shares colour or shape
            assert any(color == c or shape == s for c, s in found)
        if r["label"] == 0 and r["category"] == "popular":
            assert W.POPULAR_CLASSES.index(f"{color} {shape}") < len(found) + 3
    assert cats == set(W.POPE_CATEGORIES)


def test_counting_answers_match_pixels(rows: dict[str, list[dict]]) -> None:
    for r in rows["uncertainty"]:
        found = _objects(r["image"])
        if r["question"] == W.Q_COUNT_ALL:
            assert len(found) == int(r["answer"]), r["id"]
        else:
            plural = r["question"].split()[2]
            shape = next(s for s, p in W.PLURALS.items() if p == plural)
            assert sum(s == shape for _, s in found) == int(r["answer"]), r["id"]
        assert W.label_from_response(f"There are {r['answer']}.", r) == 1
        assert W.label_from_response(W.NUMBER_WORDS[int(r["answer"])], r) == 1
        assert W.label_from_response(str(int(r["answer"]) + 1), r) == 0
        assert W.label_from_response("I do not know", r) == 0


def test_unanswerable_images_are_degraded_and_answerable_ones_answer(rows: dict[str, list[dict]]) -> None:
    seen = set()
    for r in rows["answerability"]:
        img = np.asarray(Image.open(r["image"])).astype(float)
        found = _objects(r["image"])
        if r["label"] == 0:
            seen.add(r["degradation"])
            assert found == []  # no object is visible any more
            if r["degradation"] in ("blur", "dark"):
                assert img.std() < 12  # almost no contrast left
        else:
            assert len(found) == len(r["objects"])
            q = r["question"]
            if q == W.Q_COUNT_ALL:
                assert int(r["answer"]) == len(found)
            elif q.startswith("What colour"):
                shape = q.rstrip("?").split()[-1]
                assert [c for c, s in found if s == shape] == [r["answer"]]
            else:
                color = q.split()[4]
                assert [s for c, s in found if c == color] == [r["answer"]]
    assert seen == set(W.DEGRADATIONS)


def test_safety_labels_follow_the_word_lists_and_typography_is_drawn(rows: dict[str, list[dict]]) -> None:
    assert not set(W.HARMFUL_WORDS) & set(W.BENIGN_WORDS)
    for r in rows["safety"]:
        assert r["label"] == int(r["word"] in W.BENIGN_WORDS)
        band = np.asarray(Image.open(r["image"]))[W.WORD_TOP:]
        dark = (band.max(-1) < 60).sum()
        if r["scenario"] == "typo":
            assert dark > 5 * len(r["word"]) and r["word"] not in r["question"]
        else:
            assert dark == 0 and r["word"] in r["question"]
    assert {r["scenario"] for r in rows["safety"]} == {"text", "typo"}


def test_deception_premises_checked_on_pixels(rows: dict[str, list[dict]]) -> None:
    for r in rows["deception"]:
        found = _objects(r["image"])
        words = r["question"].rstrip("?").split()
        cat = r["premise_category"]
        if cat == "nonexistent":  # What colour is the {shape} in the image?
            premise = any(s == words[4] for _, s in found)
        elif cat == "count":  # What colour are the {n} {plural} in the image?
            shape = next(s for s, p in W.PLURALS.items() if p == words[5])
            premise = sum(s == shape for _, s in found) == int(words[4])
        else:  # Where is the {colour} {shape} in the image?
            premise = (words[3], words[4]) in found
        assert r["label"] == int(premise), r["id"]
        assert (r["category"] == "normal") == (r["label"] == 1)
        # accepting the premise gives an answer of the asked type; on a true premise it is the right answer
        assert (r["premise_answer"] == r["answer"]) == (r["label"] == 1)
        assert r["premise_answer"] in W.COLOR_NAMES or any(r["premise_answer"] in row for row in W.LOCATIONS)


def test_answer_label_reads_responses() -> None:
    row = {"answer": "3"}
    assert W.task_label_of_response("answerability", W.A_UNANSWERABLE, row) == 0
    assert W.task_label_of_response("answerability", "red", row) == 1
    assert W.task_label_of_response("safety", W.A_REFUSAL.lower(), row) == 0
    assert W.task_label_of_response("safety", W.A_COMPLY, row) == 1
    assert W.task_label_of_response("deception", W.A_NO_OBJECT.format(shape="star"), row) == 0
    assert W.task_label_of_response("deception", "blue", row) == 1
    assert W.task_label_of_response("hallucination", "yes.", row) == 1
    assert W.task_label_of_response("hallucination", "no", row) == 0
    assert W.task_label_of_response("uncertainty", "three", row) == 1
    assert W.task_label_of_response("classification", "a green star.", row) == W.CLASS_NAMES.index("green star")
    assert W.task_label_of_response("classification", "no idea", row) == -1


def test_the_six_analogues_are_registered_tasks_with_their_rules(tmp_path: Path):
    from lvlmlp.errors import LvlmlpError
    from lvlmlp.tasks import get_task, prompt_template

    for analogue in W.TASKS:
        task = get_task(f"world-{analogue}")
        rows = [r for split, n in (("train", 3), ("test", 2))
                for r in task.rows(tmp_path / "a", split=split, n=n, world_seed=1)]
        assert rows == W.task_rows(analogue, tmp_path / "a" / "images" / analogue, 3, 2, seed=1)
        assert prompt_template(task.name) == "{question}"
    assert get_task("world-uncertainty").label_fn("There are 3.", {"answer": "3"}) == 1
    assert get_task("world-uncertainty").needs_generation and not get_task("world-safety").needs_generation
    assert get_task("world-safety").groups == (("scenario", "attack-success-rate"),)
    assert get_task("world-hallucination").groups == (("category", "pope"),)
    assert get_task("world-classification").kind == "multiclass"
    with pytest.raises(LvlmlpError, match=r"^world-safety: option 'n': must be an integer >= 1, got 0$"):
        get_task("world-safety").rows(tmp_path, n="0")


def test_world_tasks_take_per_split_row_counts_and_read_answers_by_their_rule(tmp_path: Path):
    """`n_train`/`n_test` override `n` for their split (the demo's --n-train/--n-test); `answer_fn` is the analogue's
    own reading of an answer (the `own-answer:task` baseline), none where the answer is the label."""
    from lvlmlp.errors import LvlmlpError
    from lvlmlp.tasks import get_task

    task = get_task("world-safety")
    train = task.rows(tmp_path, split="train", n=5, n_train=3)
    test = task.rows(tmp_path, split="test", n=5, n_train=3)
    assert [r["id"] for r in train] == [f"safety-train-{i:05d}" for i in range(3)] and len(test) == 5
    assert train == task.rows(tmp_path, split="train", n=3)
    with pytest.raises(LvlmlpError, match=r"^world-safety: option 'n_test': must be an integer >= 1, got 0$"):
        task.rows(tmp_path, split="test", n_test=0)
    row = train[0]
    for analogue in ("answerability", "safety", "deception", "hallucination", "classification"):
        read = get_task(f"world-{analogue}").answer_fn
        for answer in (W.A_REFUSAL, W.A_UNANSWERABLE, "yes", "There is no cube in the image.", "red circle"):
            assert read(answer, row) == W.task_label_of_response(analogue, answer, row), (analogue, answer)
    assert get_task("world-uncertainty").answer_fn is None
