"""`lvlmlp tasks` (commands/tasks.py): flags that would do nothing are refused in one line naming the flag."""

from __future__ import annotations

import pytest

from lvlmlp.cli import main


@pytest.mark.parametrize("flag", [["--data-root", "x"], ["--image-root", "x"], ["--split", "train"],
                                  ["--prompt-style", "oe"], ["--task-option", "a=b"], ["--per-class", "2"],
                                  ["--seed", "1"]])
def test_tasks_refuses_dump_only_flags_without_dump(flag, capsys):
    assert main(["tasks", "vizwiz", *flag]) == 2
    assert f"tasks: {flag[0]} applies to --dump only" in capsys.readouterr().err
