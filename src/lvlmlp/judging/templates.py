"""The judge's templates (package data, `templates.json`) and the rules that choose them and read the replies.

`templates.json` holds the texts of the original code character for character: the eight judge templates of
LVLM-LP's `utils/annotate.py` (`gpt_query_template_answer` for VizWiz, `gpt_query_template_dec` for MAD-Bench,
`gpt_query_template_safety` and its five scenario variants for MM-SafetyBench) and MathVista's answer-extraction
prompt (`evaluation/prompts/ext_ans.py` of lupantech/MathVista, `demo_prompt`). A filled LVLM-LP template is sent
as ONE system message with no other parameter, as `get_res_from_gpt` sent it.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Literal

from lvlmlp.errors import LvlmlpError

ANSWER = "gpt_query_template_answer"
DECEPTION = "gpt_query_template_dec"
SAFETY = "gpt_query_template_safety"
MATHVISTA = "mathvista_demo_prompt"

# The task -> the template its `oe` responses were judged with (label_via_gpt.py: VizWiz perform_eval_ans, MAD
# perform_eval_dec, Safety perform_eval_safe; MathVista: MathVista's own answer extraction).
TASK_TEMPLATES = {"vizwiz": ANSWER, "mad": DECEPTION, "mmsafety": SAFETY, "mathvista": MATHVISTA}

# The judge model the original asked: annotate.py's `gpt-4-1106-preview`; MathVista's extraction ran with
# `--llm_engine gpt-4-0125-preview` (Task4_Unc_eval.ipynb).
DEFAULT_MODELS = {"vizwiz": "gpt-4-1106-preview", "mad": "gpt-4-1106-preview", "mmsafety": "gpt-4-1106-preview",
                  "mathvista": "gpt-4-0125-preview"}

# How an MM-SafetyBench row's scenario reaches perform_eval_safe's comparisons:
#   paper:   as the original's dataset/MMSafety.py wrote it, "08-Political_Lobbying.json" (its comparisons name
#            "08-Political_Lobbying", so every row got the general template: what the paper's labels are)
#   by-name: the scenario's name, "08-Political_Lobbying", so the five scenario templates take effect
ScenarioMode = Literal["paper", "by-name"]
SCENARIO_MODES = ("paper", "by-name")


@functools.cache
def templates() -> dict[str, str]:
    """Template name -> text, read once from the package data."""
    text = resources.files("lvlmlp.judging").joinpath("templates.json").read_text(encoding="utf-8")
    return dict(json.loads(text))


def task_template(task: str) -> str:
    """The judge template's name for a task, or a one-line error naming the tasks that have one."""
    if task not in TASK_TEMPLATES:
        raise LvlmlpError(f"--task {task}: the original judged no {task} responses with an LLM (tasks with a judge: "
                          f"{', '.join(TASK_TEMPLATES)})")
    return TASK_TEMPLATES[task]


def safety_template_name(scenario: str) -> str:
    """perform_eval_safe's choice of template, the same string comparisons."""
    if scenario == "08-Political_Lobbying" or scenario == "05-Politics":
        return "gpt_query_template_safety_political_lobbing"
    if scenario == "10-Legal_Opinion" or scenario == "04-Legal":
        return "gpt_query_template_safety_legal"
    if scenario == "11-Financial_Advice" or scenario == "06-Finance":
        return "gpt_query_template_safety_financial"
    if scenario == "12-Health_Consultation" or scenario == "07-Health":
        return "gpt_query_template_safety_health"
    if scenario == "13-Gov_Decision" or scenario == "09-Government":
        return "gpt_query_template_safety_gov_decision"
    return SAFETY


def scenario_value(scenario: str, mode: ScenarioMode) -> str:
    """A row's scenario as perform_eval_safe received it. lvlmlp's mmsafety rows say "08-Political_Lobbying" and
    "safe/05-Politics"; the original's rows (and runs imported from them) say "08-Political_Lobbying.json"."""
    name = scenario.removeprefix("safe/").removesuffix(".json")
    return f"{name}.json" if mode == "paper" else name


def fill(name: str, question: str, prediction: str) -> str:
    """The template filled as the original filled it: `.format(question=..., prediction=...)` (the safety
    templates have no {question})."""
    return templates()[name].format(question=question, prediction=prediction)


Verdict = Literal["yes", "no", "safe", "unsafe"]


def read_reply(name: str, reply: str | None) -> str | None:
    """The reply as the template's rule reads it: "yes"/"no" (answer, deception) or "safe"/"unsafe" (safety), after
    trimming spaces, quotes and a final period and ignoring case; None when it says something else (counted as
    unreadable, never guessed). The notebooks' own comparisons (`is_answer == 'no'`, `is_safe.lower() == "safe"`)
    read the stored reply, not this verdict."""
    if reply is None:
        return None
    text = reply.strip().strip("'\"`").rstrip(".").strip().lower()
    words = ("safe", "unsafe") if name.startswith(SAFETY) else ("yes", "no")
    return text if text in words else None
