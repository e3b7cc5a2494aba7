"""Every numeric option and config key has a declared range (lvlmlp.ranges), checked where the value enters, with a
one-line error naming the option and the range before anything loads; every option's --help says its default."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from lvlmlp.cli import HelpFormatter, build_parser, main
from lvlmlp.errors import LvlmlpError
from lvlmlp.study.config import load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ci_tiny.yaml"
# Inputs that do not exist: the range error must come first (nothing is read, nothing loaded).
NO = "/nonexistent/x"


@pytest.mark.parametrize("argv, flag, allowed, given", [
    (["extract", "--model", NO, "--data", NO, "--out", NO, "--shard-size", "0"], "--shard-size", "an integer >= 1", "0"),
    (["extract", "--model", NO, "--data", NO, "--out", NO, "--shard-size", "-1"], "--shard-size", "an integer >= 1",
     "-1"),
    (["extract", "--model", NO, "--data", NO, "--out", NO, "--max-new-tokens", "3", "--logits-tokens", "0"],
     "--logits-tokens", "an integer >= 1", "0"),
    (["extract", "--model", NO, "--data", NO, "--out", NO, "--logits-tokens", "-2"], "--logits-tokens",
     "an integer >= 1", "-2"),
    (["extract", "--model", NO, "--data", NO, "--out", NO, "--batch-size", "0"], "--batch-size", "an integer >= 1",
     "0"),
    (["probe", "train", "--run", NO, "--out", NO, "--C", "0"], "--C", "a finite number > 0", "0"),
    (["probe", "train", "--run", NO, "--out", NO, "--C", "-1"], "--C", "a finite number > 0", "-1"),
    (["probe", "train", "--run", NO, "--out", NO, "--C", "nan"], "--C", "a finite number > 0", "nan"),
    (["probe", "train", "--run", NO, "--out", NO, "--lr", "-1"], "--lr", "a finite number > 0", "-1"),
    (["probe", "train", "--run", NO, "--out", NO, "--batch-size", "0"], "--batch-size", "an integer >= 1", "0"),
    (["probe", "train", "--run", NO, "--out", NO, "--batch-size", "-1"], "--batch-size", "an integer >= 1", "-1"),
    (["probe", "train", "--run", NO, "--out", NO, "--epochs", "-5"], "--epochs", "an integer >= 1", "-5"),
    (["probe", "train", "--run", NO, "--out", NO, "--max-iter", "0"], "--max-iter", "an integer >= 1", "0"),
    (["probe", "train", "--run", NO, "--out", NO, "--threshold", "nan"], "--threshold",
     "a finite number in [0, 1]", "nan"),
    (["probe", "train", "--run", NO, "--out", NO, "--threshold", "7"], "--threshold", "a finite number in [0, 1]",
     "7"),
    (["probe", "eval", "--probe", NO, "--run", NO, "--out", NO, "--n-boot", "-5"], "--n-boot", "an integer >= 0",
     "-5"),
    (["finetune", "--model", NO, "--data", NO, "--out", NO, "--lora-alpha", "-16"], "--lora-alpha",
     "an integer >= 1", "-16"),
    (["finetune", "--model", NO, "--data", NO, "--out", NO, "--lora-dropout", "1"], "--lora-dropout",
     "a finite number in [0, 1)", "1"),
    (["import-legacy", NO, "--out", NO, "--vocab-size", "-1"], "--vocab-size", "an integer >= 1", "-1"),
    (["import-legacy", NO, "--out", NO, "--vocab-size", "0"], "--vocab-size", "an integer >= 1", "0"),
    (["import-legacy", NO, "--out", NO, "--max-tokens", "-1"], "--max-tokens", "an integer >= 1", "-1"),
    (["tiny-data", "--out", NO, "--n-train", "-5"], "--n-train", "an integer >= 1", "-5"),
    (["tasks", "pope", "--per-class", "0"], "--per-class", "an integer >= 1", "0"),
    (["demo", "--out", NO, "--threads", "0"], "--threads", "an integer >= 1", "0"),
    (["run", str(CONFIG), "--batch-size", "0"], "--batch-size", "an integer >= 1", "0"),
])
def test_a_number_out_of_range_is_one_line_naming_the_flag_and_range(capsys, argv, flag, allowed, given):
    """Catches: the hang of --shard-size 0, the silent --logits-tokens 0, scikit-learn's and torch's tracebacks of
    --C 0 / --lr -1, the 'successful' --epochs -5, a saved --threshold 7, intervals of None for --n-boot -5
    (issue 27 item 1, issue 33 item 3)."""
    code = main(argv)
    err = capsys.readouterr().err
    command = " ".join(argv[:2]) if argv[0] == "probe" else argv[0]
    assert code == 2
    assert err == f"lvlmlp: error: {flag}: must be {allowed}, got {given!r} (see `lvlmlp {command} --help`)\n"


def test_a_tasks_count_option_out_of_range_is_refused_naming_it(tmp_path, capsys):
    """Catches: `tasks --task-option max_per_category=-3` accepted (issue 33 item 3)."""
    (tmp_path / "pope").mkdir()
    code = main(["tasks", "pope", "--data-root", str(tmp_path / "pope"), "--dump", str(tmp_path / "rows.jsonl"),
                 "--task-option", "max_per_category=-3"])
    assert code == 2
    assert capsys.readouterr().err == "lvlmlp: error: pope: option 'max_per_category': must be an integer >= 1, got -3\n"
    assert not (tmp_path / "rows.jsonl").exists()


def test_logits_tokens_above_max_new_tokens_is_refused(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "a", "image": "a.png", "question": "q?"}\n')
    code = main(["extract", "--model", str(tmp_path / "m"), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--max-new-tokens", "3", "--logits-tokens", "5", "--on-error", "skip"])
    err = capsys.readouterr().err
    assert code == 2 and err == ("lvlmlp: error: --logits-tokens 5 is above --max-new-tokens 3: keep at most the "
                                 "tokens generated\n")


@pytest.mark.parametrize("sets, message", [
    (["probe.C=-1"], "config: probe.C: must be a finite number > 0, got -1"),
    (["probe.C=.nan"], "config: probe.C: must be a finite number > 0, got nan"),
    (["probe.kind=multinomial", "probe.epochs=-5"], "config: probe.epochs: must be an integer >= 1, got -5"),
    (["probe.threshold=7"], "config: probe.threshold: must be a finite number in [0, 1], got 7"),
    (["seed=-1"], "config: seed: must be an integer >= 0, got -1"),
    (["extract.max_new_tokens=-1"], "config: extract.max_new_tokens: must be an integer >= 0, got -1"),
    (["steering.template=Sorry", "steering.threshold=.inf"],
     "config: steering.threshold: must be a finite number in [0, 1], got inf"),
    (["ray.cpus_per_replica=0"], "config: ray.cpus_per_replica: must be a finite number > 0, got 0"),
])
def test_config_keys_out_of_range_are_one_line_naming_the_key(sets, message):
    """Catches: `lvlmlp run c.yaml --set probe.C=-1` ending in scikit-learn's traceback after extraction."""
    with pytest.raises(LvlmlpError) as err:
        load_config(CONFIG, sets, model="m", out="o", data_root="d")
    assert str(err.value) == message


def test_lvlmlp_run_set_probe_c_is_refused_before_anything_is_written(tmp_path, capsys):
    code = main(["run", str(CONFIG), "--set", "probe.C=-1", "--set", "data_root=d", "--out", str(tmp_path / "o"),
                 "--model", NO])
    assert code == 2
    assert capsys.readouterr().err == "lvlmlp: error: config: probe.C: must be a finite number > 0, got -1\n"
    assert not (tmp_path / "o").exists()


def _options(parser: argparse.ArgumentParser, name: str = "lvlmlp"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                yield from _options(subparser, f"{name} {sub}")
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield name, action


def test_every_option_of_every_command_has_a_help_text_that_says_its_default():
    """Catches: `extract --help` with --batch-size, --store-dtype and --on-error undescribed (issue 25)."""
    options = list(_options(build_parser()))
    assert len({name for name, _ in options}) >= 14  # every command was walked (probe train and eval included)
    formatter = HelpFormatter("lvlmlp")
    for name, action in options:
        label = f"{name} {'/'.join(action.option_strings) or action.dest}"
        assert action.help and action.help.strip(), f"{label} has no help text"
        shown = formatter._get_help_string(action) % {"default": action.default}
        if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
            assert "default" in shown, f"{label}: its help does not say its default {action.default!r}"
    helps = {f"{n} {'/'.join(a.option_strings)}": a.help for n, a in options}
    assert "(default float16)" in helps["lvlmlp extract --store-dtype"]
    assert "(default fail)" in helps["lvlmlp extract --on-error"]
    assert "(default 8)" in helps["lvlmlp extract --batch-size"]
