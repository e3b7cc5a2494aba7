"""Issue 32: the words each task's prompt style asks for (tasks/answers.yaml) are the prompt's own words, character
for character, and finetuning, its readout and guided decoding take their defaults from them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lvlmlp.steering.guard import SAFETY_TEMPLATE, default_guard
from lvlmlp.study.finetune import default_answers, readout_for, row_targets
from lvlmlp.tasks import DATASET_ANSWER, get_task, list_tasks, prompt_styles, prompt_template

FIXTURES = Path(__file__).parents[1] / "fixtures" / "lvlm-lp"
# A quoted phrase of the original's prompts: 'WORDS' opened after a space (so "there's" opens nothing); the
# question's own placeholder '{question}' is not an answer.
QUOTED = re.compile(r"(?:^|(?<=\s))'([^']+)'(?=[\s.,]|$)")


def quoted_words(template: str) -> set[str]:
    return {w for w in QUOTED.findall(template) if w != "{question}"}


STYLES = [(t.name, s) for t in list_tasks() for s in prompt_styles(t.name)]


@pytest.mark.parametrize(("task", "style"), STYLES)
def test_default_targets_are_the_words_the_prompt_asks_for(task, style):
    template = prompt_template(task, style)
    words = {label: w for label, w in default_answers(task, style).items() if w != DATASET_ANSWER}
    assert set(words) <= {0, 1}
    if task == "pope":  # a yes/no question whose words are the dataset's answers (checked below), not the prompt's
        assert words == {1: "yes", 0: "no"}
        return
    for word in words.values():
        assert word in template, (task, style, word)
    if task != "jsonl":  # the original's prompts quote every answer they ask for: all of them, and only those
        assert set(words.values()) == quoted_words(template), (task, style)


def test_the_quoted_answers_of_the_original_prompts():
    # The prompt texts read by hand: which quoted words speak for which label (label 1: answerable, safe, normal).
    assert quoted_words(prompt_template("vizwiz", "mq")) == {"Unanswerable", "Answerable"}
    assert default_answers("vizwiz", "mq") == {1: "Answerable", 0: "Unanswerable"}
    assert "'Yes' for potential harm or illegality, or 'No' if the instruction and image are deemed safe" in \
        prompt_template("mmsafety", "mq")
    assert default_answers("mmsafety", "mq") == {1: "No", 0: "Yes"}  # label 1 = safe -> "No" (issue 32)
    assert "reply with 'No'. Otherwise, 'Yes'." in prompt_template("mad", "mq")
    assert default_answers("mad", "mq") == {1: "Yes", 0: "No"}
    assert default_answers("mmsafety", "oeh") == {0: "I cannot help you with that."}
    assert default_answers("mad", "oeh") == {0: "Sorry, I cannot answer your question."}
    assert default_answers("vizwiz", "oeh") == default_answers("mathvista", "oeh") == {1: DATASET_ANSWER,
                                                                                       0: "Unanswerable"}
    for task, style in (("vizwiz", "oe"), ("vizwiz", "conf"), ("mmsafety", "oe"), ("mmsafety", "hard"),
                        ("mad", "oe"), ("imagenet", "oe"), ("world-safety", "oe")):
        assert default_answers(task, style) == {}, (task, style)
    assert default_answers(None, "mq") == {} and default_answers("mad", "my-template") == {}
    assert default_answers("mathvista", None) == default_answers("mathvista", "oeh")  # the task's default style


def test_pope_targets_are_the_answers_of_popes_files(tmp_path):
    (tmp_path / "val2014").mkdir()
    rows = get_task("pope").rows(FIXTURES / "pope", tmp_path / "val2014", split="val")
    raw = {}
    for f in (FIXTURES / "pope").glob("coco_val_pope_*.json"):
        cat = f.stem.rsplit("_", 1)[1]
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            raw[f"{cat}/{rec['question_id']}"] = rec["label"]
    targets = row_targets(rows, default_answers("pope", "oe"), "pope")
    assert targets == [raw[r["id"]] for r in rows] and set(targets) == {"yes", "no"}


def test_row_targets_take_the_table_words_and_the_dataset_answer():
    rows = [{"id": "a", "label": 1}, {"id": "b", "label": 0}]
    assert row_targets(rows, default_answers("mmsafety", "mq"), "t") == ["No", "Yes"]
    viz = [{"id": "a", "label": 1, "answers": ["red", "blue", "red"]}, {"id": "b", "label": 0, "answers": ["x"]}]
    assert row_targets(viz, default_answers("vizwiz", "oeh"), "t") == ["red", "Unanswerable"]
    from lvlmlp.errors import LvlmlpError

    with pytest.raises(LvlmlpError, match=r"row 'a' \(label 1\): no target answer"):
        row_targets([{"id": "a", "label": 1}], default_answers("mmsafety", "oeh"), "t")  # no words for safe rows
    with pytest.raises(LvlmlpError, match=r"row 'b' \(label 0\): no target answer"):
        row_targets([{"id": "b", "label": 0}], default_answers("mmsafety", "oe"), "t")


def test_readouts_and_guided_decoding_defaults_read_the_table():
    mq = readout_for(default_answers("mmsafety", "mq"))
    assert (mq.token, mq.negate) == ("No", False) and mq.own("No, it is safe.", {}) == 1
    assert mq.own("Yes", {}) == 0
    oeh = readout_for(default_answers("vizwiz", "oeh"))  # label 1's words are each row's answer: read label 0's
    assert (oeh.token, oeh.negate) == ("Unanswerable", True) and oeh.own("Unanswerable", {}) == 0
    assert default_guard("mmsafety", "mq") == (None, {1: "No", 0: "Yes"})
    assert default_guard("pope", "oe") == (None, {1: "yes", 0: "no"})
    assert default_guard("mad", "oeh") == ("Sorry, I cannot answer your question.", None)
    assert default_guard("vizwiz", "oeh") == ("Unanswerable", None)
    # no task, the default style (oe), a style without words, a custom template ("")
    for task, style in ((None, None), ("mmsafety", None), ("mmsafety", "oe"), ("mmsafety", "")):
        assert default_guard(task, style) == (SAFETY_TEMPLATE, None), (task, style)


def test_lvlmlp_tasks_shows_the_answer_words(capsys):
    from lvlmlp.cli import main

    assert main(["tasks", "mmsafety"]) == 0
    out = capsys.readouterr().out
    assert "answer words of mq: 1 = 'No', 0 = 'Yes'\n" in out
    assert "answer words of oeh: 0 = 'I cannot help you with that.'\n" in out
    assert main(["tasks", "vizwiz"]) == 0
    assert "answer words of oeh: 1 = the dataset answer, 0 = 'Unanswerable'\n" in capsys.readouterr().out
