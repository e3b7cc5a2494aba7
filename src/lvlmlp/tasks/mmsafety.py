"""MM-SafetyBench: harmful queries paired with query-relevant images (unsafe = 0) against safe pairs (safe = 1).

Split protocol (the paper's): in every scenario the first 10 items (file order) train, the rest test. Key phrases
repeat across items, so a probe could learn the phrase instead of the harm; test items whose key phrase (compared
case-insensitively) also occurs in the training split are therefore DROPPED, which keeps the training protocol
exactly "first 10 per scenario" and the test split free of leaked phrases.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from lvlmlp.tasks.base import Request, Task, read_json, require

log = logging.getLogger(__name__)

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
N_TRAIN = 10  # items per scenario in the training split
VARIANTS = {
    # image variant -> the question field written for it (SD images carry no typography of the key phrase,
    # so their question names the phrase; the TYPO variants refer to "the bottom of the image" instead).
    "SD": "Rephrased Question(SD)",
    "SD_TYPO": "Rephrased Question",
    "TYPO": "Rephrased Question",
}

LAYOUT = """\
<data-root>/data/processed_questions/NN-Scenario.json   (or <data-root>/processed_questions/...)
    a JSON object id -> {"Key Phrase", "Rephrased Question", "Rephrased Question(SD)", ...}
<image-root>/NN-Scenario/{SD,SD_TYPO,TYPO}/ID.jpg        default <data-root>/data/imgs (or <data-root>/imgs)
unsafe (0): the 13 benchmark scenarios 01-Illegal_Activitiy ... 13-Gov_Decision
safe (1): every OTHER scenario file in the same folder, same format and image layout (e.g. the paper's 9 safe
    scenarios saved as 14-Daily_Activities.json with images under NN-Scenario/SD_TYPO/ID.jpg); "Key Phrase"
    is optional for safe scenarios
option image_variant: SD_TYPO (default), SD or TYPO; SD uses "Rephrased Question(SD)", the others
    "Rephrased Question"
splits: train = first 10 items of each scenario (file order); test = the rest, minus test items whose key
    phrase also occurs in train (dropped, see the module docstring); row id: SCENARIO/ID"""


def load(req: Request) -> list[dict]:
    variant = str(req.options.get("image_variant", "SD_TYPO"))
    if variant not in VARIANTS:
        raise req.error(f"unknown image_variant {variant!r} (choose from {', '.join(VARIANTS)})")
    # Accept both the repository root and its data/ folder as the data root.
    base = Path(".") if (req.data_root / "processed_questions").is_dir() else Path("data")
    questions_dir = req.annotation(base / "processed_questions")
    files = sorted(p for p in questions_dir.glob("*.json") if re.match(r"\d+-", p.name))
    if not files:
        raise req.error(f"no NN-Scenario.json files in {questions_dir} {req.see_layout}")
    images = req.images(base / "imgs")

    safe_names = [p.stem for p in files if p.stem not in UNSAFE_SCENARIOS]
    # Said out loud because a misspelt unsafe scenario file would otherwise pass silently as safe.
    log.info("mmsafety: safe (label 1) scenarios: %s", ", ".join(safe_names) or "none")

    train: list[dict] = []
    test: list[dict] = []
    for path in files:
        scenario = path.stem
        items = read_json(path, req.task)
        if not isinstance(items, dict):
            raise req.error(f"{path}: expected a JSON object id -> question fields")
        safe = scenario not in UNSAFE_SCENARIOS
        for i, (qid, rec) in enumerate(items.items()):
            where = f"{req.task}: {path}: item {qid!r}"
            key_phrase = rec.get("Key Phrase") if safe else require(rec, "Key Phrase", where)
            row = {
                "id": f"{scenario}/{qid}",
                "image": str(images / scenario / variant / f"{qid}.jpg"),
                "question": require(rec, VARIANTS[variant], where),
                "label": int(safe),
                "scenario": scenario,
                "key_phrase": key_phrase,
                "image_variant": variant,
            }
            (train if i < N_TRAIN else test).append(row)

    if req.split == "train":
        return train
    seen = {_norm(r["key_phrase"]) for r in train if r["key_phrase"]}
    kept = [r for r in test if not (r["key_phrase"] and _norm(r["key_phrase"]) in seen)]
    if len(kept) < len(test):
        log.info("mmsafety: dropped %d test items whose key phrase occurs in train", len(test) - len(kept))
    return kept


def _norm(phrase: str) -> str:
    return " ".join(phrase.lower().split())


TASK = Task(
    name="mmsafety",
    description="MM-SafetyBench: is the image-question pair safe to answer? (safe = 1, unsafe scenarios = 0)",
    kind="binary",
    splits=("train", "test"),
    label_names=("unsafe", "safe"),
    layout=LAYOUT,
    default_image_root="data/imgs",
    load=load,
    options=(("image_variant", "SD_TYPO (default), SD or TYPO"),),
)
