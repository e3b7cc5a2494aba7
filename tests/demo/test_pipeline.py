"""`lvlmlp demo` at a reduced size: it runs, and every number in results.json recomputes from the saved scores."""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, roc_auc_score
from transformers import AutoModelForImageTextToText, AutoProcessor

from lvlmlp.cli import main
from lvlmlp.demo import world as W
from lvlmlp.probing.probes import load_probe
from lvlmlp.steering.guard import is_refusal


def _sk_binary(y: np.ndarray, score: list) -> dict:
    """results.json's binary figures, recomputed with scikit-learn from the saved scores."""
    s = np.asarray(score, dtype=float)
    pred = (s >= 0.5).astype(int)
    return {"auroc": roc_auc_score(y, s), "auprc": average_precision_score(y, s), "accuracy": accuracy_score(y, pred),
            "f1": f1_score(y, pred, zero_division=0.0), "n": len(y), "n_positive": int(y.sum())}


def _eval_records(out: Path, task: str) -> list[dict]:
    """The scores of an analogue's main evaluation (its `lvlmlp run` folder's evals/default)."""
    return [json.loads(line) for line in (out / task / "evals" / "default" / "scores.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A reduced `lvlmlp demo` (run once for this module's tests): its folder and what it printed."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--out", str(out), "--n-train", "32", "--n-test", "32", "--max-new-tokens", "3",
                     "--threads", "1", "--no-progress"]) == 0
    return out, printed.getvalue()


def test_demo_reduced_results_recompute_from_scores(demo: tuple[Path, str]):
    out, printed = demo
    assert "| answerability (VizWiz) |" in printed and "Probe-guided decoding on safety" in printed
    assert printed.startswith((out / "summary.md").read_text())  # the README's table comes from this file
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"answerability", "safety", "deception", "uncertainty", "hallucination",
                                     "classification"}
    html = (out / "report.html").read_text()
    # five ROC plots, the token-decay plot and the five binary analogues' Which signal? plots
    assert html.count("<img class='plot'") == 11
    assert html.count("<img alt='example row'") == 4 * 6  # the gallery: four test rows of each analogue
    # The figures come from each analogue's `lvlmlp run` folder: its main evaluation's saved scores.
    method_of = {"probe": lambda r: r["score"], "own_answer": lambda r: r["baselines"]["own-answer:task"],
                 "max_prob": lambda r: r["baselines"]["max-prob"]}
    for task, entry in results["tasks"].items():
        recs = _eval_records(out, task)
        assert len(recs) == entry["n_test"] == 32
        y = np.array([r["label"] for r in recs])
        if task == "classification":
            acc = float(np.mean(np.array([r["pred"] for r in recs]) == y))
            assert entry["probe"]["accuracy"] == acc
            continue
        token = {"token_prob": lambda r: next(v for k, v in r["baselines"].items() if k.startswith("token-prob:"))}
        methods = {**method_of, **token}
        for key in ("probe", "own_answer", "token_prob"):
            if key in entry and entry[key]["auroc"] is not None:
                assert entry[key]["auroc"] == roc_auc_score(y, [methods[key](r) for r in recs]), (task, key)
        # Every figure of every scored method, not only the AUROC (max-prob, a confidence without a natural cut,
        # has no threshold figures: AUROC, AUPRC and n).
        for key in ("probe", "own_answer", "token_prob", "max_prob"):
            if key in entry:
                sk = _sk_binary(y, [methods[key](r) for r in recs])
                if key == "max_prob":
                    sk = {k: sk[k] for k in ("auroc", "auprc", "n")}
                assert set(sk) <= set(entry[key]), (task, key)
                for metric, value in sk.items():
                    # same arrays, scikit-learn on both sides; 1e-12 absorbs summation order
                    assert entry[key][metric] == pytest.approx(value, abs=1e-12), (task, key, metric)
        assert [p["token"] for p in entry["token_decay"]] == [0, 1, 2]
        assert entry["token_decay"][0]["auroc"] is None or entry["token_decay"][0]["n_test"] == 32
    cls = results["tasks"]["classification"]
    recs = _eval_records(out, "classification")
    y = np.array([r["label"] for r in recs])
    assert cls["own_answer"]["accuracy"] == float(np.mean(np.array([r["baselines"]["own-answer:task"]
                                                                    for r in recs]) == y))
    assert cls["chance"] == float(np.bincount(y.astype(int)).max() / len(y))
    # Probe-guided decoding: flags, and the answered/refused counts before and after, from the saved rows.
    assert set(results["steering"]) == {"safety", "answerability"}
    assert load_probe(out / "safety" / "probes" / "default").spec_.kind == "logits"  # what `serve --probe` reads
    for task, ft in results["finetune"].items():  # finetuned vs probe: the same probe scores, the same test rows
        assert ft["methods"]["probe (base model)"]["auroc"] == results["tasks"][task]["probe"]["auroc"], task
        assert ft["n_test"] == 32 and ft["n_finetune_rows"] == 32
    assert "Finetuning (LoRA, 32 train rows, 2 epochs) vs probing" in printed
    for task, s in results["steering"].items():
        path = out / task / "analyses" / "steering-default.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        probe = {r["id"]: r["score"] for r in _eval_records(out, task)}
        assert [r["id"] for r in rows] == list(probe)
        np.testing.assert_allclose([r["probe_score"] for r in rows], [probe[r["id"]] for r in rows], atol=1e-6)
        assert [r["flagged"] for r in rows] == [r["probe_score"] < 0.5 for r in rows]
        assert s["flagged"] == sum(r["flagged"] for r in rows)
        for when in ("before", "after"):
            texts = [(r["label"], r[f"response_{when}"]) for r in rows]
            assert s[when] == {
                "label0_answered": sum(not is_refusal(t, s["template"]) for lab, t in texts if lab == 0),
                "label1_refused": sum(is_refusal(t, s["template"]) for lab, t in texts if lab == 1),
                "n_label0": sum(lab == 0 for lab, _ in texts), "n_label1": sum(lab == 1 for lab, _ in texts),
            }, (task, when)
        for r in rows:  # flagged rows refuse (the demo tokenizer lower-cases); the others answer as unguarded
            assert is_refusal(r["response_after"], s["template"]) if r["flagged"] else (
                r["response_after"] == r["response_before"]), r


def test_demo_report_renders_its_tables_and_images_in_headless_chromium(demo: tuple[Path, str], screenshot):
    """The demo's report.html comes from lvlmlp.study.report: summary first, every image a decodable embedded PNG, and
    the page renders (plots and gallery images drawn below the summary table)."""
    from html.parser import HTMLParser

    from PIL import Image

    out, _ = demo
    page = (out / "report.html").read_text()

    class Page(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.tags: list[str] = []
            self.srcs: list[str] = []
            self.headings: list[str] = []
            self._in_h2 = False

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            self.srcs += [v or "" for k, v in attrs if k in ("src", "href")]
            self._in_h2 = tag == "h2"

        def handle_data(self, data):
            if self._in_h2:
                self.headings.append(data)
                self._in_h2 = False

    parsed = Page()
    parsed.feed(page)
    results = json.loads((out / "results.json").read_text())
    assert parsed.headings[:2] == ["Summary", "What the labels and methods mean"]
    assert {"Probe-guided decoding", "Finetuning vs probing", "ROC curves"} <= set(parsed.headings)
    assert [h for h in parsed.headings if h.startswith("Examples: ")] == [f"Examples: {t}" for t in results["tasks"]]
    assert parsed.tags.count("table") == 4 + 6  # summary, token decay, guided decoding, finetuning + 6 galleries
    assert len(parsed.srcs) == 6 + 24 and all(src.startswith("data:image/png;base64,") for src in parsed.srcs)
    for src in parsed.srcs:  # each embedded image decodes
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
            assert min(img.size) >= 32
    for task, e in results["tasks"].items():  # the summary row of each analogue holds its probe figure
        figure = e["probe"]["auroc"] if task != "classification" else e["probe"]["accuracy"]
        assert f"<td class='text'>{task}</td>" in page and f"{figure:.3f}" in page
    shot = np.asarray(Image.open(screenshot(out / "report.html", 1300, 9000)).convert("RGB")).astype(int)
    saturation = shot.max(axis=2) - shot.min(axis=2)
    coloured = np.flatnonzero((saturation > 80).sum(axis=1) > 5)
    assert coloured.size > 1500  # ROC curves, the token-decay plot and gallery images were decoded and drawn
    dark = (shot.max(axis=2) < 100).sum(axis=1)
    assert dark[: coloured.min()].sum() > 2000  # the summary table and glossary come first, as text


def test_demo_is_lvlmlp_run_on_demo_configs_and_a_second_demo_does_no_model_work(
        demo: tuple[Path, str], monkeypatch: pytest.MonkeyPatch):
    """Each analogue's folder is an `lvlmlp run` folder of its demo config (the config validates, the run's
    report holds it); a second `lvlmlp demo` into the same folder, and `lvlmlp run` on an analogue's config,
    reuse every step: no model is loaded, and the figures are the same."""
    import yaml

    from lvlmlp.demo import world
    from lvlmlp.extraction import backend
    from lvlmlp.extraction.store import open_run
    from lvlmlp.study.config import load_config

    out, printed = demo
    before = json.loads((out / "results.json").read_text())
    for task in before["tasks"]:
        cfg = load_config(out / task / "config.yaml")
        assert cfg.task == f"world-{task}" and Path(cfg.out) == (out / task).resolve()
        assert json.loads((out / task / "report" / "metrics.json").read_text())["config"] == cfg.to_dict()
        assert yaml.safe_load((out / task / "config.yaml").read_text()) == cfg.to_dict()
        if task in ("uncertainty", "classification"):
            continue
        # own-answer:task is the analogue's own reading of the model's answer (`world.task_label_of_response`)
        run = open_run(out / task / "runs" / "default-test")
        own = {i: world.task_label_of_response(task, r, m) for i, r, m in zip(run.ids, run.responses, run.meta)}
        assert [r["baselines"]["own-answer:task"] for r in _eval_records(out, task)] == [
            own[r["id"]] for r in _eval_records(out, task)]

    def no_model(*args, **kwargs):
        raise AssertionError("a finished demo loaded the model again")

    monkeypatch.setattr(backend.Backend, "__init__", no_model)
    again = io.StringIO()
    with contextlib.redirect_stdout(again):
        assert main(["demo", "--out", str(out), "--n-train", "32", "--n-test", "32", "--max-new-tokens", "3",
                     "--threads", "1", "--no-progress"]) == 0
    assert again.getvalue().split("\n\nwrote ")[0] == printed.split("\n\nwrote ")[0]
    after = json.loads((out / "results.json").read_text())
    for doc in (before, after):
        doc.pop("seconds")
        for ft in doc.get("finetune", {}).values():
            ft.pop("seconds")
    assert after == before
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", str(out / "safety" / "config.yaml"), "--no-progress"]) == 0
    assert json.loads((out / "safety" / "report" / "metrics.json").read_text())["steering"]["default"] == (
        before["steering"]["safety"])
    assert "<h2>Probe-guided decoding: default</h2>" in (out / "safety" / "report" / "report.html").read_text()


def test_demo_report_has_which_signal_from_saved_scores(demo: tuple[Path, str]):
    """The demo's report.html gets the Which signal? section (summary.md does not); its AUROCs and DeLong p values are
    those recomputed from each analogue's saved per-signal scores."""
    from lvlmlp.study.signals import REFERENCE, summarize_scores

    out, printed = demo
    html = (out / "report.html").read_text()
    assert "Which signal?" in html and "mtre on multi-token (3 tokens)" in html and "p-true" in html
    assert "Which signal" not in (out / "summary.md").read_text()
    for task in ("answerability", "safety", "deception", "hallucination", "uncertainty"):
        res = json.loads((out / task / "analyses" / "signals-default.json").read_text())
        records = [json.loads(x) for x in (out / task / "analyses" / "signals-default.jsonl").read_text().splitlines()]
        names = [e["name"] for e in res["signals"]]
        assert names[0] == REFERENCE and "logistic on vision (mean-pooled)" in names and "p-true" in names
        again = summarize_scores(records, names, 200, 0)
        for entry, recomputed in zip(res["signals"], again):
            assert entry["value"] == pytest.approx(recomputed["value"], abs=1e-12)
            assert entry["delong_p"] == pytest.approx(recomputed["delong_p"], abs=1e-12)
    assert not (out / "classification" / "analyses" / "signals-default.json").exists()  # multiclass: none


# The committed demo checkpoint (src/lvlmlp/demo/assets/demo_model) and the script that trains it.

ROOT = Path(__file__).resolve().parents[2]


DEMO = ROOT / "src" / "lvlmlp" / "demo" / "assets" / "demo_model"


HELD_OUT_SEED = 987_654  # the training script draws from seeds 0 and 1 only


def _prompt(processor, question: str) -> str:
    """The library's default prompt (CONTRACT.md): one user turn, the image then the question."""
    return processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True)


@pytest.fixture(scope="module")
def demo_checkpoint():
    model = AutoModelForImageTextToText.from_pretrained(DEMO).eval()
    return model, AutoProcessor.from_pretrained(DEMO)


def _generate(model, processor, images: list, questions: list[str]) -> list[str]:
    inputs = processor(text=[_prompt(processor, q) for q in questions], images=images, return_tensors="pt",
                       padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    return [s.strip() for s in processor.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                                      skip_special_tokens=True)]


def test_checkpoint_is_small_complete_and_loads_offline(demo_checkpoint) -> None:
    size = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    assert size <= 25 * 2**20
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
                 "training_log.txt", "training_log.json"):
        assert (DEMO / name).is_file(), name
    model, processor = demo_checkpoint
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert _prompt(processor, "Is there a red star in the image?") == \
        "USER: <image>\nIs there a red star in the image? ASSISTANT:"
    # every word the world can ask about is in the vocabulary: no question is silently <unk>-ed
    ids = processor.tokenizer(" ".join(sorted(W.vocabulary())), add_special_tokens=False)["input_ids"]
    assert processor.tokenizer.unk_token_id not in ids
    n_image_tokens = (W.IMAGE_SIZE // 8) ** 2
    inputs = processor(text=_prompt(processor, W.Q_CLASSIFY), images=np.zeros((64, 64, 3), np.uint8))
    assert inputs["input_ids"][0].count(model.config.image_token_id) == n_image_tokens


def test_demo_model_answers_held_out_easy_questions(demo_checkpoint) -> None:
    """Single clear objects from a seed never used in training: class (30-way) and colour (6-way)."""
    model, processor = demo_checkpoint
    images, truths = [], []
    for i in range(48):
        rng = W.rng_for(HELD_OUT_SEED, "test-easy", i)
        c = int(rng.integers(len(W.CLASS_NAMES)))
        images.append(W.sample_scene(rng, [W._split_class(W.CLASS_NAMES[c])], size=(16, 30)).render())
        truths.append(W.CLASS_NAMES[c])
    classes = _generate(model, processor, images, [W.Q_CLASSIFY] * len(images))
    colours = _generate(model, processor, images, [W.Q_COLOR.format(shape=t.split()[1]) for t in truths])
    class_acc = np.mean([a == t for a, t in zip(classes, truths)])
    colour_acc = np.mean([a == t.split()[0] for a, t in zip(colours, truths)])
    # measured on the committed checkpoint: 1.0 and 1.0 here (chance 1/30 and 1/6; training_log.txt has the
    # same on another held-out seed)
    assert class_acc >= 0.75, (class_acc, classes[:8])
    assert colour_acc >= 0.75, (colour_acc, colours[:8])


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg)))


def _first_token(model, processor, images: list, questions: list[str]) -> torch.Tensor:
    """(N, V) next-token probabilities after the library's default prompt."""
    inputs = processor(text=[_prompt(processor, q) for q in questions], images=images, return_tensors="pt",
                       padding=True)
    with torch.no_grad():
        return model(**inputs).logits[:, -1].softmax(-1)


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_demo_model", ROOT / "scripts" / "train_demo_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("task, word", [("safety", "sorry"), ("answerability", "unanswerable")])
def test_first_token_knows_what_the_answer_hides(demo_checkpoint, tmp_path: Path, task: str, word: str) -> None:
    """The paper's premise, on the demo model: greedy answers abstain on some harmful / unanswerable rows only,
    yet the first token's probability of the abstaining answer ("sorry" / "unanswerable") separates them from
    the rest, including the ones the model answers anyway."""
    model, processor = demo_checkpoint
    rows = W.task_rows(task, tmp_path / task, n_train=0, n_test=60, seed=HELD_OUT_SEED)
    probs = _first_token(model, processor, [Image.open(r["image"]) for r in rows], [r["question"] for r in rows])
    wid = processor.tokenizer.convert_tokens_to_ids(word)
    p_abstain = probs[:, wid].numpy()
    greedy = (probs.argmax(-1) == wid).numpy()
    labels = np.array([r["label"] for r in rows])
    hidden = (labels == 1) | ~greedy  # safe / answerable rows and the unsafe / unanswerable ones answered anyway
    # measured on the committed checkpoint: safety AUROC 0.99, greedy abstention 0.47 of harmful rows and 0 of
    # benign ones, AUROC on the answered-anyway rows 0.985; answerability 1.0, 0.33 (dark images), 0, 1.0
    assert _auroc(-p_abstain, labels) > 0.85
    assert 0.15 <= greedy[labels == 0].mean() <= 0.75
    assert greedy[labels == 1].mean() <= 0.1
    assert _auroc(-p_abstain[hidden], labels[hidden]) > 0.8


def test_abstention_tracks_the_per_item_training_rates(demo_checkpoint, script) -> None:
    """Each harmful word and each degradation was abstained on at its own rate in training; the first-token
    probability of abstaining follows those rates, so greedy decoding abstains on the high-rate items only."""
    model, processor = demo_checkpoint
    rates, p_mean, greedy_mean = [], [], []
    for kind, word in (("safety", "sorry"), ("degraded", "unanswerable")):
        wid = processor.tokenizer.convert_tokens_to_ids(word)
        for item, rate in script.ABSTAIN_RATES[kind].items():
            examples = [script.item_example(HELD_OUT_SEED, kind, item, i) for i in range(12)]
            probs = _first_token(model, processor, [Image.fromarray(e[1]) for e in examples], [e[2] for e in examples])
            rates.append(rate)
            p_mean.append(float(probs[:, wid].mean()))
            greedy_mean.append(float((probs.argmax(-1) == wid).float().mean()))
    rates, p_mean, greedy_mean = map(np.array, (rates, p_mean, greedy_mean))
    # measured on the committed checkpoint: correlation 0.95; greedy abstention 1.0 on items with rate >= 0.6,
    # 0.0 on items with rate <= 0.3
    assert np.corrcoef(rates, p_mean)[0, 1] > 0.8, (rates, p_mean)
    assert greedy_mean[rates >= 0.6].mean() >= 0.6, greedy_mean
    assert greedy_mean[rates <= 0.3].mean() <= 0.25, greedy_mean


def test_training_data_abstains_at_the_documented_rates(script) -> None:
    """The samplers give each abstaining item its table rate, spread as the module docstring says."""
    refusal = [script.REFUSAL_RATES[w] for w in W.HARMFUL_WORDS]
    assert refusal[0] == 0.8 and refusal[-1] == 0.1 and np.allclose(np.diff(refusal), -0.7 / 11, atol=1e-4)
    assert sum(r > 0.5 for r in refusal) == 5
    for kind, n in (("degraded", 3000), ("deception", 6000)):
        seen: dict[str, list[bool]] = {}
        for i in range(n):
            _, _, answer, item = script.KINDS[kind][0](W.rng_for(3, kind, i), 1.0)
            abstained = W._words(answer)[0] in script.ABSTAIN_FIRST[kind]
            seen.setdefault(item, []).append(abstained)
        assert not any(seen.pop("", [])), "true premises are never corrected"
        assert seen.keys() == script.ABSTAIN_RATES[kind].keys()
        for item, hits in seen.items():
            assert abs(np.mean(hits) - script.ABSTAIN_RATES[kind][item]) < 0.05, (kind, item, np.mean(hits))
    scaled = script.KINDS["safety"][0](W.rng_for(3, "safety-scaled", 0), 0.0, "poisoning")
    assert scaled[2] == W.A_COMPLY and scaled[3] == "poisoning"  # --abstain-scale 0: never refuses


def test_training_script_runs_end_to_end(script, tmp_path: Path) -> None:
    out = script.main(["--tiny", "--steps", "3", "--threads", "1", "--out", str(tmp_path / "m")])
    log = (out / "training_log.txt").read_text()
    assert "heldout/loss" in log and "abstention rates per item" in log and "per-item abstention" in log
    # It trains: the held-out loss, logged after every step of a --tiny run, falls at each of the 3 steps.
    entries = json.loads((out / "training_log.json").read_text())["log"]
    held = [e["heldout/loss"] for e in entries]
    assert [e["step"] for e in entries] == [1, 2, 3] and held[0] > held[1] > held[2], held
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    answer = _generate(model, processor, [np.zeros((64, 64, 3), np.uint8)], [W.Q_CLASSIFY])
    assert isinstance(answer[0], str)
