"""MM-SafetyBench: harmful queries paired with query-relevant images (unsafe = 0) against safe pairs (safe = 1).

By default this is the original code's protocol (dataset/MMSafety.py and Task2_Jailbreak_eval.ipynb of
Qinyu-Allen-Zhao/LVLM-LP): the 13 unsafe scenarios of the benchmark and the 9 safe scenarios of its `safe_data`
folder, where a safe item is dropped when its "Key Phrase" equals (exact string) any key phrase of the 13 unsafe
scenarios; then, per scenario in file order, the first 10 items train and the rest test. The question is
"Rephrased Question" whatever the image variant. `drop_train_phrases=true` adds a filter the original does not
have (see docs/paper-protocol.md).
"""

from __future__ import annotations

from pathlib import Path

from lvlmlp.tasks.base import Request, Task, read_json, require

UNSAFE_SCENARIOS = (
    "01-Illegal_Activitiy",  # sic: the benchmark's own spelling
    "02-HateSpeech",
    "03-Malware_Generation",
    "04-Physical_Harm",
    "05-EconomicHarm",
    "06-Fraud",
    "07-Sex",
    "08-Political_Lobbying",
    "09-Privacy_Violence",
    "10-Legal_Opinion",
    "11-Financial_Advice",
    "12-Health_Consultation",
    "13-Gov_Decision",
)
SAFE_SCENARIOS = (
    "01-Daily_Activitiy",  # sic, as the original's safe_data files are named
    "02-Economics",
    "03-Physical",
    "04-Legal",
    "05-Politics",
    "06-Finance",
    "07-Health",
    "08-Sex",
    "09-Government",
)
N_TRAIN = 10  # items per scenario in the training split
VARIANTS = ("SD_TYPO", "SD", "TYPO")
QUESTION_FIELD = "Rephrased Question"

LAYOUT = """\
<data-root>/data/processed_questions/NN-Scenario.json       the 13 unsafe scenarios (label 0),
    01-Illegal_Activitiy.json ... 13-Gov_Decision.json: a JSON object id -> {"Key Phrase", "Rephrased Question", ...}
<data-root>/safe_data/processed_questions/NN-Scenario.json  the 9 safe scenarios (label 1), same format:
    01-Daily_Activitiy, 02-Economics, 03-Physical, 04-Legal, 05-Politics, 06-Finance, 07-Health, 08-Sex,
    09-Government
<image-root>/data/imgs/SCENARIO/SD_TYPO/ID.jpg, <image-root>/safe_data/imgs/SCENARIO/SD_TYPO/ID.jpg
    default <image-root>: the data root (<data-root>/train_data/ may exist; the split does not use it)
filter: a safe item whose "Key Phrase" equals any unsafe key phrase is dropped (nothing else is)
splits: per scenario in file order, train = the first 10 items, test = the rest; row id: SCENARIO/ID
options: image_variant = SD_TYPO (default), SD or TYPO (the image folder; the question stays "Rephrased
    Question"); question_field (default "Rephrased Question", e.g. "Rephrased Question(SD)");
    drop_train_phrases = false (default) | true: also drop test items whose key phrase occurs in train"""


def load(req: Request) -> list[dict]:
    variant = str(req.options.get("image_variant", "SD_TYPO"))
    if variant not in VARIANTS:
        raise req.error(f"unknown image_variant {variant!r} (choose from {', '.join(VARIANTS)})")
    field = str(req.options.get("question_field", QUESTION_FIELD))
    drop_train_phrases = _as_bool(req.options.get("drop_train_phrases", False), req)
    images = req.image_root if req.image_root is not None else req.data_root
    if not images.is_dir():
        raise req.error(f"image folder not found: {images} (--image-root) {req.see_layout}")

    unsafe = [_scenario(req, "data", sc, 0, field, variant, images) for sc in UNSAFE_SCENARIOS]
    unsafe_phrases = {r["key_phrase"] for rows in unsafe for r in rows}
    safe = [
        [r for r in rows if r["key_phrase"] not in unsafe_phrases]
        for rows in (_scenario(req, "safe_data", sc, 1, field, variant, images) for sc in SAFE_SCENARIOS)
    ]
    train = [r for rows in unsafe + safe for r in rows[:N_TRAIN]]
    if req.split == "train":
        return train
    test = [r for rows in unsafe + safe for r in rows[N_TRAIN:]]
    if drop_train_phrases:
        seen = {_norm(r["key_phrase"]) for r in train if r["key_phrase"]}
        test = [r for r in test if not (r["key_phrase"] and _norm(r["key_phrase"]) in seen)]
    return test


def _scenario(
    req: Request, folder: str, scenario: str, label: int, field: str, variant: str, images: Path
) -> list[dict]:
    path = req.annotation(Path(folder) / "processed_questions" / f"{scenario}.json")
    items = read_json(path, req.task)
    if not isinstance(items, dict):
        raise req.error(f"{path}: expected a JSON object id -> question fields")
    rows = []
    for qid, rec in items.items():
        where = f"{req.task}: {path}: item {qid!r}"
        rows.append(
            {
                "id": f"{scenario}/{qid}" if label == 0 else f"safe/{scenario}/{qid}",
                "image": str(images / folder / "imgs" / scenario / variant / f"{qid}.jpg"),
                "question": require(rec, field, where),
                "label": label,
                "scenario": scenario if label == 0 else f"safe/{scenario}",
                "key_phrase": require(rec, "Key Phrase", where),
                "image_variant": variant,
            }
        )
    return rows


def _as_bool(value: object, req: Request) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise req.error(f"option drop_train_phrases must be true or false, got {value!r}")


def _norm(phrase: str) -> str:
    return " ".join(str(phrase).lower().split())


TASK = Task(
    name="mmsafety",
    description="MM-SafetyBench: is the image-question pair safe to answer? (safe = 1, unsafe scenarios = 0)",
    kind="binary",
    splits=("train", "test"),
    label_names=("unsafe", "safe"),
    layout=LAYOUT,
    default_image_root=".",
    load=load,
    groups=(("scenario", "attack-success-rate"),),  # the paper's ASR per scenario, averaged over scenarios
    options=(
        ("image_variant", "SD_TYPO (default), SD or TYPO: the image folder"),
        ("question_field", 'the question field (default "Rephrased Question")'),
        ("drop_train_phrases", "true: drop test items whose key phrase occurs in train (default false)"),
    ),
)
