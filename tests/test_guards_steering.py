"""Guards of probe-guided decoding on a tiny real LLaVA: the threshold decides exactly which rows are flagged (API and
`generate --threshold`), several batches, forced answers of unequal token length, seeded sampling, refusals of a
probe of the wrong size or with more than two classes. Each test names the breakage it catches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessorList

from lvlmlp.cli import main
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.backend import Backend
from lvlmlp.extraction.extract import extract
from lvlmlp.probing.probes import LogisticProbe, MultinomialProbe
from lvlmlp.steering.guard import ProbeGuard, guarded_generate

TEMPLATE = "I cannot answer."
LABELS = [1, 0, 1, 0, 1, 0]
K = 9


@pytest.fixture(scope="module")
def world(tiny_ckpt, tmp_path_factory):
    """A manifest of 6 rows, its float32 run, a saved probe that flags rows 1, 3, 5 at 0.5, and its scores."""
    root = tmp_path_factory.mktemp("guard")
    rng = np.random.default_rng(5)
    rows = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, size=(18 + 7 * i, 40 - 3 * i, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append({"id": f"r{i}", "image": f"{i}.png", "question": "what is in " * (1 + i % 3) + "it?",
                     "label": LABELS[i]})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ckpt = tiny_ckpt("llava")
    backend = Backend(ckpt, device="cpu")
    abs_rows = [dict(r, image=str(root / r["image"])) for r in rows]
    run = extract(backend, abs_rows, root / "run", store_dtype="float32", batch_size=6, workers=0, progress=False)
    X = np.asarray(run.logits(0), dtype=np.float32)
    probe = LogisticProbe(C=1e4, standardize=True, max_iter=2000).fit(X, np.array(LABELS))
    probe.save(root / "probe")
    scores = probe.predict_proba(X)[:, 1]
    assert (scores < 0.5).tolist() == [False, True, False, True, False, True]
    # A threshold between the two lowest scores: exactly one row flagged, not the three that 0.5 flags.
    low = np.sort(scores)
    threshold = float((low[0] + low[1]) / 2)
    images = [Image.open(root / r["image"]).convert("RGB") for r in rows]
    batch = backend.encode(images, [r["question"] for r in rows])
    return {"root": root, "ckpt": ckpt, "backend": backend, "probe": probe, "scores": scores, "X": X,
            "threshold": threshold, "batch": batch, "rows": rows, "images": images}


def test_threshold_between_two_scores_flags_exactly_the_rows_below_it(world):
    """Catches: ProbeGuard flagging at a hard-coded 0.5 (or <=) instead of its threshold."""
    backend, batch, thr = world["backend"], world["batch"], world["threshold"]
    plain = backend.model.generate(**batch, max_new_tokens=K, do_sample=False,
                                   pad_token_id=backend.tokenizer.pad_token_id)
    guard = ProbeGuard(world["probe"], backend.tokenizer, TEMPLATE, threshold=thr)
    out = guarded_generate(backend.model, batch, guard, max_new_tokens=K, do_sample=False,
                           pad_token_id=backend.tokenizer.pad_token_id)
    expected = world["scores"] < thr
    assert expected.sum() == 1 and guard.flagged_.tolist() == expected.tolist()
    np.testing.assert_allclose(guard.scores_, world["scores"], atol=1e-6)
    n_prompt, n_tpl = batch["input_ids"].shape[1], len(guard.template_ids)
    for i, flagged in enumerate(expected):
        if flagged:
            assert out[i, n_prompt : n_prompt + n_tpl].tolist() == guard.template_ids
        else:
            assert torch.equal(out[i], plain[i])
    # Exactly at a row's score the row is not flagged (flagged means strictly below).
    at = ProbeGuard(world["probe"], backend.tokenizer, TEMPLATE, threshold=float(np.sort(world["scores"])[1]))
    guarded_generate(backend.model, batch, at, max_new_tokens=1, do_sample=False)
    assert at.flagged_.sum() == 1


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_cli_threshold_over_several_batches_and_seeded_sampling(world, tmp_path, capsys):
    """Catches: `generate --threshold` ignored, rows of a later batch scored or flagged as the first, sampling not
    reproducible for a seed, or unflagged rows sampled differently from the unguarded run."""
    root = world["root"]
    base = ["generate", "--model", str(world["ckpt"]), "--data", str(root / "data.jsonl"), "--probe",
            str(root / "probe"), "--device", "cpu", "--batch-size", "4", "--max-new-tokens", str(K), "--no-progress",
            "--template", TEMPLATE, "--eval"]
    out = tmp_path / "g.jsonl"
    assert main([*base, "--threshold", repr(world["threshold"]), "--out", str(out)]) == 0
    lines = _read(out)
    assert [x["id"] for x in lines] == [r["id"] for r in world["rows"]]
    np.testing.assert_allclose([x["probe_score"] for x in lines], world["scores"], atol=1e-5)
    assert [x["flagged"] for x in lines] == (world["scores"] < world["threshold"]).tolist()
    for x in lines:
        assert x["response"].startswith(TEMPLATE) == x["flagged"]
        if not x["flagged"]:
            assert x["response"] == x["response_unguarded"]
    assert json.loads((tmp_path / "g.metrics.json").read_text())["threshold"] == world["threshold"]
    assert f"1 flagged (threshold {world['threshold']:g})" in capsys.readouterr().out

    sampled = []
    for name, seed in (("s1", "3"), ("s2", "3"), ("s3", "4")):
        assert main([*base, "--do-sample", "--temperature", "1.5", "--seed", seed, "--out",
                     str(tmp_path / f"{name}.jsonl")]) == 0
        sampled.append(_read(tmp_path / f"{name}.jsonl"))
    assert sampled[0] == sampled[1]  # same seed, same output
    assert [x["response"] for x in sampled[0]] != [x["response"] for x in sampled[2]]  # it really samples
    for x in sampled[0]:
        assert x["flagged"] == (x["probe_score"] < 0.5)
        assert x["response"].startswith(TEMPLATE) if x["flagged"] else x["response"] == x["response_unguarded"]


def test_forced_answers_of_unequal_token_length_then_greedy(world):
    """Catches: a forcing plan that stops all rows at the shortest answer or pads the shorter one."""
    backend, batch, probe = world["backend"], world["batch"], world["probe"]
    guard = ProbeGuard(probe, backend.tokenizer, answers={1: "yes", 0: "it is not there"})
    assert len(guard.answer_ids[0]) > len(guard.answer_ids[1])
    out = guarded_generate(backend.model, batch, guard, max_new_tokens=K, do_sample=False,
                           pad_token_id=backend.tokenizer.pad_token_id)
    n_prompt = batch["input_ids"].shape[1]
    for i, flagged in enumerate(world["scores"] < 0.5):
        forced = guard.answer_ids[0 if flagged else 1]
        assert out[i, n_prompt : n_prompt + len(forced)].tolist() == forced
        # Reference: the row alone, greedy from its prompt + its forced answer.
        one = backend.encode([world["images"][i]], [world["rows"][i]["question"]])
        ids = torch.cat([one["input_ids"], torch.tensor([forced])], 1)
        ext = dict(one, input_ids=ids, attention_mask=torch.ones_like(ids))
        ref = backend.model.generate(**ext, max_new_tokens=K - len(forced), do_sample=False,
                                     pad_token_id=backend.tokenizer.pad_token_id)
        n_ref = ref.shape[1] - ids.shape[1]
        assert out[i, n_prompt + len(forced) : n_prompt + len(forced) + n_ref].tolist() == ref[0, ids.shape[1]:].tolist()


def test_probe_of_another_vocabulary_or_with_three_classes_is_refused(world, tmp_path, capsys):
    """Catches: a probe applied to logits of another size, or a multiclass probe used as a binary guard."""
    backend, X = world["backend"], world["X"]
    small = LogisticProbe().fit(X[:, :-1], np.array(LABELS))
    guard = ProbeGuard(small, backend.tokenizer, TEMPLATE)
    with pytest.raises(LvlmlpError, match=rf"the probe expects {X.shape[1] - 1} logits but the model produces "
                                          rf"{X.shape[1]}"):
        guarded_generate(backend.model, world["batch"], guard, max_new_tokens=1)
    small.save(tmp_path / "small")
    assert main(["generate", "--model", str(world["ckpt"]), "--data", str(world["root"] / "data.jsonl"), "--probe",
                 str(tmp_path / "small"), "--template", TEMPLATE, "--device", "cpu", "--out",
                 str(tmp_path / "o.jsonl"), "--no-progress"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (after transformers' weight-loading bar)
    assert last.startswith("lvlmlp: error: ") and f"dim {X.shape[1]} (probe expects {X.shape[1] - 1})" in last
    three = MultinomialProbe(epochs=1).fit(X, np.array([0, 1, 2, 0, 1, 2]))
    with pytest.raises(LvlmlpError, match="ProbeGuard needs a binary probe; this one has 3 classes"):
        ProbeGuard(three, backend.tokenizer, TEMPLATE)
    with pytest.raises(LvlmlpError, match="does not support beam search"):
        backend.model.generate(**world["batch"], max_new_tokens=2, num_beams=2,
                               logits_processor=LogitsProcessorList([ProbeGuard(world["probe"], backend.tokenizer,
                                                                                TEMPLATE)]))
