"""`lvlmlp finetune` on tiny real checkpoints, in depth on LLaVA and Qwen2-VL: the loss goes down, the merged folder
reloads and equals base + adapter (peft), training is deterministic and resumes per epoch exactly, the loss reads only
the answer tokens, bad input fails in one line before any training, and the comparison with the probe runs; and one
step on every family (the family check of finetuning)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lvlmlp.cli import main
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.backend import Backend
from lvlmlp.extraction.families import quirks_of
from lvlmlp.study.finetune import (
    IGNORE,
    Settings,
    answer_loss,
    compare,
    encode_examples,
    finetune,
    readout_for,
    row_targets,
    target_ids,
)
from lvlmlp.testing import FAMILIES as ALL_FAMILIES
from lvlmlp.testing import SPECS

FAMILIES = ["llava", "qwen2_vl"]
# Every tiny family the backend runs (a refused family never reaches finetuning).
EVERY = [f for f in ALL_FAMILIES if not quirks_of(SPECS[f].model_type).refused]
FAST = Settings(epochs=2, lr=5e-3, batch_size=4, seed=3)


def make_rows(root: Path, n: int = 8) -> list[dict]:
    """Random images of two sizes, questions of varied lengths (so prompts are left-padded), labels 1, 0, 1, ..."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = root / "img" / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(28 + 4 * (i % 2), 28, 3), dtype=np.uint8)).save(path)
        question = " ".join(["is", "there", "a", "cat", "in", "the", "image"][: 3 + i % 4]) + " ?"
        rows.append({"id": f"r{i}", "image": str(path), "question": question, "label": 1 - i % 2})
    return rows


def backend_of(path: Path) -> Backend:
    return Backend(path, device="cpu", dtype="float32")


def adapter_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def log_losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_decreases_and_merged_model_equals_base_plus_adapter(family, tiny_ckpt, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    rows = make_rows(tmp_path)
    targets = row_targets(rows, {1: "yes", 0: "no"}, "test")
    summary = finetune(backend_of(tiny_ckpt(family)), rows, targets, tmp_path / "ft",
                       Settings(epochs=4, lr=5e-3, batch_size=4), progress=False)
    losses = summary["epoch_loss"]
    assert len(losses) == 4 and losses[-1] < losses[0] * 0.8
    assert len(log_losses(tmp_path / "ft")) == 4 * 2  # one entry per optimizer step (8 rows / batch 4)

    # Logits of the reloaded merged folder vs the base model with the saved adapter applied by peft.
    probe = backend_of(tiny_ckpt(family))
    batch = probe.encode([Image.open(r["image"]) for r in rows[:3]], [r["question"] for r in rows[:3]])
    pos = probe.generation_position_ids(batch)
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "ft" / "model").eval()
    base = AutoModelForImageTextToText.from_pretrained(tiny_ckpt(family)).eval()
    with torch.no_grad():
        before = base(**batch, position_ids=pos).logits
        adapted = PeftModel.from_pretrained(base, tmp_path / "ft" / "adapter").eval()
        want = adapted(**batch, position_ids=pos).logits
        got = merged(**batch, position_ids=pos).logits
    assert (want - before).abs().max() > 1e-3  # the adapter changed something
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", EVERY)
def test_one_step_on_every_family(family, tiny_ckpt, tmp_path):
    """The family check of finetuning: one optimizer step on 4 rows, a finite loss, and exactly the LoRA targets'
    weights changed in the merged model."""
    rows = make_rows(tmp_path, 4)
    backend = backend_of(tiny_ckpt(family))
    targets = row_targets(rows, {1: "yes", 0: "no"}, "test")
    settings = Settings(epochs=1, lr=5e-3, batch_size=4)
    if SPECS[family].lora_targets:  # the default names are not all there: a one-line error naming what is
        with pytest.raises(LvlmlpError, match=r"^--lora-targets: unknown target module 'o_proj' in the language "
                                              r"model \(Linear layers there: .*out_proj"):
            finetune(backend, rows, targets, tmp_path / "ft", settings, progress=False)
        settings = Settings(epochs=1, lr=5e-3, batch_size=4, target_modules=SPECS[family].lora_targets)
    before = {k: v.clone() for k, v in backend.model.state_dict().items()}
    summary = finetune(backend, rows, targets, tmp_path / "ft", settings, progress=False)
    assert len(log_losses(tmp_path / "ft")) == 1 and np.isfinite(summary["epoch_loss"]).all()
    after = backend.model.state_dict()  # the merged model (adapter folded in)
    assert after.keys() == before.keys()
    regex = re.compile(summary["target_modules_regex"])
    trained = {k for k in before if k.endswith(".weight") and regex.match(k.removesuffix(".weight"))}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert trained and changed == trained


@pytest.mark.parametrize("family", EVERY)
def test_training_sees_the_answer_as_generation_does(family, tiny_ckpt, tmp_path):
    """Teacher forcing on the model's own greedy answer gives, at every answer position, the logits `generate` gave
    there: a training batch puts the answer tokens in the context that inference does (token types, positions,
    Mllama's cross-attention mask, ...)."""
    rows = make_rows(tmp_path, 4)
    backend = backend_of(tiny_ckpt(family))
    images, questions = [Image.open(r["image"]) for r in rows], [r["question"] for r in rows]
    # Answers of text tokens, as finetuning targets are (a tiny model may well pick its image token); 3 for every row.
    specials = sorted(set(backend.tokenizer.added_tokens_decoder) | set(backend.eos_ids))
    gen = backend.generate(backend.encode(images, questions), max_new_tokens=3, suppress_tokens=specials)
    assert (gen["n_tokens"] == 3).all()
    answers = [gen["sequences"][i, :3].tolist() for i in range(4)]
    batch = encode_examples(backend, images, questions, answers)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "answer_len")}
    with torch.no_grad():
        logits = backend.model(**backend.to_device(inputs), position_ids=backend.generation_position_ids(inputs)).logits
    torch.testing.assert_close(logits[:, -4:-1].float(), gen["logits"], atol=1e-4, rtol=0)


def test_deterministic_with_a_seed_and_resumes_per_epoch_exactly(tiny_ckpt, tmp_path):
    rows = make_rows(tmp_path)
    targets = row_targets(rows, {1: "yes", 0: "no"}, "test")
    model = tiny_ckpt("llava")
    finetune(backend_of(model), rows, targets, tmp_path / "a", FAST, progress=False)
    finetune(backend_of(model), rows, targets, tmp_path / "b", FAST, progress=False)
    # interrupted after epoch 1, then the same command with 2 epochs resumes from the checkpoint
    finetune(backend_of(model), rows, targets, tmp_path / "c", Settings(**{**FAST.__dict__, "epochs": 1}),
             progress=False)
    assert json.loads((tmp_path / "c" / "finetune.json").read_text())["epochs_done"] == 1
    finetune(backend_of(model), rows, targets, tmp_path / "c", FAST, progress=False)
    other = Settings(**{**FAST.__dict__, "seed": 4})
    finetune(backend_of(model), rows, targets, tmp_path / "d", other, progress=False)

    a = adapter_weights(tmp_path / "a")
    for name in ("b", "c"):
        np.testing.assert_allclose(log_losses(tmp_path / name), log_losses(tmp_path / "a"), rtol=0, atol=1e-6)
        for key, value in adapter_weights(tmp_path / name).items():
            torch.testing.assert_close(value, a[key], atol=1e-6, rtol=0)
    d = adapter_weights(tmp_path / "d")
    assert any((d[k] - a[k]).abs().max() > 1e-4 for k in a)
    with pytest.raises(LvlmlpError, match="other settings"):
        finetune(backend_of(model), rows, targets, tmp_path / "a", Settings(**{**FAST.__dict__, "lr": 1e-3}))


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_loss_reads_only_the_answer_tokens(family, tiny_ckpt, tmp_path):
    import torch.nn.functional as F

    rows = make_rows(tmp_path, 4)
    backend = backend_of(tiny_ckpt(family))
    tok = backend.tokenizer
    targets = [target_ids(tok, t, tok.eos_token_id, "test") for t in ["yes", "two birds sit on a wire", "no", "red"]]
    batch = encode_examples(backend, [Image.open(r["image"]) for r in rows], [r["question"] for r in rows], targets)
    prompt = backend.collate([Image.open(r["image"]) for r in rows], [r["question"] for r in rows])["input_ids"]
    assert batch["input_ids"].shape[1] == prompt.shape[1] + int(batch["answer_len"])
    assert torch.equal(batch["input_ids"][:, : prompt.shape[1]], prompt)  # the extraction prompt, unchanged
    for i, t in enumerate(targets):
        labels = batch["labels"][i]
        assert (labels[: prompt.shape[1]] == IGNORE).all()  # image, prompt and left padding: masked
        assert labels[prompt.shape[1] : prompt.shape[1] + len(t)].tolist() == t
        assert (labels[prompt.shape[1] + len(t) :] == IGNORE).all()  # right padding of shorter answers
        assert batch["input_ids"][i, prompt.shape[1] : prompt.shape[1] + len(t)].tolist() == t
        assert t[-1] == tok.eos_token_id

    # Independent computation: full logits, the usual shifted cross-entropy over every labelled position.
    with torch.no_grad():
        got = answer_loss(backend, batch)
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "answer_len")}
        logits = backend.model(**inputs, position_ids=backend.generation_position_ids(inputs)).logits
        want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=IGNORE)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_bad_input_fails_in_one_line_before_training(tiny_ckpt, tmp_path):
    rows = make_rows(tmp_path, 4)
    backend = backend_of(tiny_ckpt("llava"))
    unlabelled = [{k: v for k, v in r.items() if k != "label"} for r in rows]
    with pytest.raises(LvlmlpError, match="row 'r0' has no label"):
        row_targets(unlabelled, {1: "yes", 0: "no"}, "manifest x")
    with pytest.raises(LvlmlpError, match="no target answer"):
        row_targets(rows, {0: "Unanswerable"}, "task vizwiz")  # label-1 rows without a dataset answer
    for phrase in ("<image>", " "):  # the image token is not text; blank encodes to nothing
        with pytest.raises(LvlmlpError, match="cannot encode"):
            finetune(backend, rows, [phrase] * 4, tmp_path / "bad")
    with pytest.raises(LvlmlpError, match="unknown target module 'qkv_proj'"):
        finetune(backend, rows, ["yes"] * 4, tmp_path / "bad", Settings(target_modules=("q_proj", "qkv_proj")))
    assert not (tmp_path / "bad").exists()  # nothing written, nothing trained


def test_cli_finetunes_a_manifest_and_extract_loads_the_result(tiny_ckpt, tmp_path, capsys):
    rows = make_rows(tmp_path, 4)
    rows[0]["target"] = "two birds"  # a row's own target overrides --answers
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ft"
    args = ["finetune", "--model", str(tiny_ckpt("llava")), "--data", str(manifest), "--answers", "yes,no",
            "--epochs", "1", "--batch-size", "2", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    assert "model" in capsys.readouterr().out
    assert main(["extract", "--model", str(out / "model"), "--data", str(manifest), "--out", str(tmp_path / "run"),
                 "--no-progress", "--device", "cpu"]) == 0
    # --task: the prompt style's template and answer words (mq: Yes/No), rows of --split train
    for r in rows:
        r.pop("target", None)
        r["split"] = "train"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["finetune", "--model", str(tiny_ckpt("llava")), "--task", "jsonl", "--data-root", str(manifest),
                 "--prompt-style", "mq", "--epochs", "1", "--device", "cpu", "--no-progress",
                 "--out", str(tmp_path / "ft_task")]) == 0
    assert "Reply yes or no" in (tmp_path / "ft_task" / "finetune.json").read_text()
    bad = tmp_path / "nolabels.jsonl"
    bad.write_text(json.dumps({"id": "a", "image": rows[1]["image"], "question": "q ?"}) + "\n")
    assert main([*args[:4], str(bad), *args[5:]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no label" in err
    assert main([*args, "--lora-targets", "nope"]) == 2
    assert "unknown target module 'nope'" in capsys.readouterr().err


def test_compare_reports_finetuned_and_probes_per_epoch(tiny_ckpt, tmp_path):
    from lvlmlp.probing.probes import make_probe

    rows = make_rows(tmp_path, 8)
    train, test = rows[:4], rows[4:]
    made = []  # the probe on the finetuned model's logits is the caller's (the configured probe's factory)

    def factory():
        made.append(make_probe("logistic", {"max_iter": 1000}))
        return made[-1]

    result = compare(tiny_ckpt("llava"), train, test, row_targets(train, {1: "yes", 0: "no"}, "t"), tmp_path / "cmp",
                     Settings(epochs=2, lr=5e-3, batch_size=4), readout_for({1: "yes", 0: "no"}),
                     np.array([0.9, 0.2, 0.6, 0.4]), device="cpu", dtype="float32", n_boot=50, progress=False,
                     make_probe=factory)
    assert len(made) == 1 and made[0].coef_ is not None
    methods = result["methods"]
    assert methods["probe (base model)"]["auroc"] == 1.0  # the given scores rank test labels 1, 0, 1, 0 perfectly
    assert set(methods) == {"probe (base model)", "finetuned: own answer", "finetuned: answer prob",
                            "probe (finetuned model)"}
    assert [e["epoch"] for e in result["per_epoch"]] == [1, 2]
    # The last epoch's evaluation (adapter active) and the merged model's agree on the answer-token probability.
    assert result["per_epoch"][-1]["answer_prob"]["auroc"] == pytest.approx(methods["finetuned: answer prob"]["auroc"])
    again = compare(tiny_ckpt("llava"), train, test, row_targets(train, {1: "yes", 0: "no"}, "t"), tmp_path / "cmp",
                    Settings(epochs=2, lr=5e-3, batch_size=4), readout_for({1: "yes", 0: "no"}),
                    np.array([0.9, 0.2, 0.6, 0.4]), device="cpu", dtype="float32", n_boot=50, progress=False,
                    make_probe=factory)
    again.pop("seconds"), result.pop("seconds")
    assert again == result  # resumed: nothing retrained, the same numbers


def test_run_config_finetune_section_adds_table_and_epoch_plot(tiny_ckpt, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from lvlmlp.extraction.store import open_run

    rows = make_rows(tmp_path, 16)
    for i, r in enumerate(rows):
        r["split"] = "train" if i < 10 else "test"
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {tiny_ckpt('llava')}\ntask: jsonl\ndata_root: {manifest}\nprompt: mq\ndevice: cpu\n"
                      "dtype: float32\nanalyses: {token_decay: false, layer_sweep: false}\nn_boot: 50\n"
                      f"out: {tmp_path / 'out'}\nfinetune: {{epochs: 2, lr: 0.005, batch_size: 8, max_new_tokens: 2}}\n")
    assert main(["run", str(config), "--no-progress"]) == 0
    doc = json.loads((tmp_path / "out" / "report" / "metrics.json").read_text())
    res = doc["finetune"]
    assert [e["epoch"] for e in res["per_epoch"]] == [1, 2] and len(res["epoch_loss"]) == 2
    # the base-model probe of the comparison, recomputed independently from the run's stored logits
    train, test = (open_run(tmp_path / "out" / "runs" / f"mq-{s}") for s in ("train", "test"))
    x = [np.asarray(r.logits(0), dtype=np.float32) for r in (train, test)]
    want = roc_auc_score(test.labels, LogisticRegression(max_iter=1000).fit(x[0], train.labels).predict_proba(x[1])[:, 1])
    assert res["methods"]["probe (base model)"]["auroc"] == pytest.approx(want, abs=1e-6)
    report = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "## Finetuning vs probing" in report and "finetuned: own answer" in report
    assert (tmp_path / "out" / "report" / "finetune_epochs.png").stat().st_size > 1000
    from lvlmlp.study.experiment import load_config

    with pytest.raises(LvlmlpError, match="unknown key finetune.'epoch'"):  # at load time, before any model work
        load_config(config, ["finetune.epoch=3"])
