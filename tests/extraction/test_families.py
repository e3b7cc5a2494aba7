"""docs/models.md's coverage table agrees with the family registry and transformers' image-text-to-text types, and
a refused family (or one whose package is missing) is stopped with a one-line error naming the reason."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction import families
from lvlmlp.testing import FAMILIES, SPECS

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "models.md"


def _script():
    spec = importlib.util.spec_from_file_location("models_table", ROOT / "scripts" / "models_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _doc_rows() -> dict[str, list[str]]:
    """model_type -> the cells of its row, read from the page as a reader sees it (not from the script)."""
    rows: dict[str, list[str]] = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| ") else []
        model_type = next((m.group(1) for c in cells[:2] if (m := re.fullmatch(r"`([^`]+)`", c))), None)
        if model_type and model_type != "model_type":
            assert model_type not in rows, f"{model_type} has two rows in docs/models.md"
            rows[model_type] = cells
    return rows


def test_table_is_what_the_script_writes() -> None:
    script = _script()
    assert script.current(DOC.read_text()) == script.render(), "run python scripts/models_table.py"
    assert script.main(["--check"]) == 0


def test_every_image_text_to_text_model_type_has_one_row() -> None:
    rows = _doc_rows()
    assert sorted(rows) == sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
    script = _script()
    built = {spec.model_type for spec in SPECS.values()}
    assert set(script.NAMES) == built  # a name and hub ids for every tiny family, none for a family without one
    assert not set(script.LEFT_OUT) & built  # a family with a tiny checkpoint is not also "left out"


def test_exact_rows_are_exactly_the_checked_families() -> None:
    """'exact' on the page means: a tiny family that tests/test_backend.py runs through the family checks."""
    rows = _doc_rows()
    exact = {t for t, cells in rows.items() if len(cells) == 7 and cells[3] == "exact"}
    checked = {SPECS[name].model_type for name in FAMILIES}
    assert exact == {t for t in checked if not families.quirks_of(t).refused}
    for model_type in rows.keys() - checked:  # left-out rows: model_type, reason
        assert len(rows[model_type]) == 2 and rows[model_type][1], model_type
    for model_type in ("gemma3", "llava_onevision", "idefics2", "mistral3", "qwen3_vl", "internvl", "aya_vision",
                       "mllama", "glm4v", "fast_vlm", "gemma3n", "perception_lm"):  # as issue 29 asks
        assert rows[model_type][3] == "exact", model_type
    for model_type in ("fast_vlm", "gemma3n", "perception_lm"):  # their vision towers are timm models
        assert rows[model_type][6].endswith("needs timm"), model_type
    assert rows["kosmos-2"][3] == f"refused: {families.quirks_of('kosmos-2').refused}"


def test_guided_decoding_and_finetuning_columns_say_what_the_family_checks_ran() -> None:
    """Every exact family is checked for guided decoding and finetuning (tests/steering/test_guard.py and
    tests/study/test_finetune.py parametrize over every family the backend runs), with the LoRA targets its check
    used where the defaults are not there; a refused family is checked for neither."""
    rows = _doc_rows()
    for name, spec in SPECS.items():
        cells = rows[spec.model_type]
        if families.quirks_of(spec.model_type).refused:
            assert cells[4:6] == ["no (refused)", "no (refused)"], name
            continue
        assert cells[4] == "checked", name
        targets = f" with `--lora-targets {','.join(spec.lora_targets)}` (no `o_proj`)" if spec.lora_targets else ""
        assert cells[5] == "checked" + targets, name
    assert {n for n, s in SPECS.items() if s.lora_targets} == {"blip-2", "lfm2_vl"}


def test_checked_set_is_the_exact_families() -> None:
    exact = {SPECS[f].model_type for f in FAMILIES if not families.quirks_of(SPECS[f].model_type).refused}
    assert families.CHECKED == exact


def test_an_unchecked_family_runs_with_a_warning(tiny_ckpt, monkeypatch, caplog) -> None:
    from lvlmlp.extraction.backend import Backend

    path = tiny_ckpt("llava")
    with caplog.at_level("WARNING", logger="lvlmlp.extraction.backend"):
        Backend(path, device="cpu", load_model=False)
    assert not caplog.records  # a checked family: no warning
    monkeypatch.setattr("lvlmlp.extraction.backend.CHECKED", families.CHECKED - {"llava"})
    with caplog.at_level("WARNING", logger="lvlmlp.extraction.backend"):
        Backend(path, device="cpu", load_model=False)
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: model type 'llava' is not one of the checked families (docs/models.md): compare a few rows with "
        "single runs before trusting batched results"
    ]


def test_a_refused_family_stops_every_command_with_its_reason(tiny_ckpt, tmp_path, monkeypatch, capsys) -> None:
    from lvlmlp.cli import main
    from lvlmlp.extraction.backend import Backend
    from lvlmlp.testing import tiny_manifest

    path = tiny_ckpt("llava")
    reason = "its batched first-token logits differ from single runs"
    monkeypatch.setitem(families.QUIRKS, "llava", families.Quirks(refused=reason))
    with pytest.raises(LvlmlpError) as err:
        Backend(path, device="cpu")
    assert str(err.value) == f"{path}: llava models are refused: {reason} (see docs/models.md)"
    manifest = tiny_manifest(tmp_path / "data", n_train=2, n_test=0)
    out = tmp_path / "run"
    capsys.readouterr()  # the fixture's own output
    code = main(["extract", "--model", str(path), "--data", str(manifest), "--out", str(out), "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"lvlmlp: error: {err.value}"
    assert not out.exists()  # stopped before anything was written


def test_a_family_whose_package_is_missing_names_it(tiny_ckpt, monkeypatch) -> None:
    """FastVLM's tower is a timm model: with timm unimportable (None in sys.modules: what find_spec reports for a
    package that is not installed), a real FastVLM checkpoint stops naming it, before its processor or weights load."""
    import sys

    from lvlmlp.extraction.backend import Backend

    path = tiny_ckpt("fast_vlm")
    assert families.quirks_of("fast_vlm").needs == ("timm",)
    monkeypatch.setitem(sys.modules, "timm", None)
    assert importlib.util.find_spec("timm") is None
    with pytest.raises(LvlmlpError) as err:
        Backend(path, device="cpu")
    assert str(err.value) == f"{path}: fast_vlm models need timm; install it with `pip install timm`"
    monkeypatch.undo()
    assert Backend(path, device="cpu", load_model=False).family == "fast_vlm"  # with timm back, it loads
