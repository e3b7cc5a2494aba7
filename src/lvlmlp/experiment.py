"""`lvlmlp run CONFIG.yaml`: one YAML file describes an experiment of the paper; one command runs all of it.

Steps, each skipped when its output exists with the same settings (a stamp in `OUT/steps/` holds a hash of
them), so that re-running a finished config does no model work and an interrupted one resumes:

1. extraction: one run folder per prompt and split, `OUT/runs/{prompt}-{split}` (the extractor itself resumes
   a half-written run row by row);
2. the CLIP/SigLIP baseline (`clip:`): `OUT/runs/clip-{kind}-{split}`;
3. per prompt: the probe on first-token logits against the baselines (`OUT/evals/{prompt}`, a `probe eval`
   folder, probe in `OUT/probes/{prompt}`), token-position decay and the layer sweep (`OUT/analyses/`);
4. the report `OUT/report/` (metrics.json, report.md, report.html with every table and plot), always rewritten.

Command-line flags override the file: `--model`, `--out`, `--device`, `--limit`, `--batch-size`, and any key with
`--set a.b=value` (the value is read as YAML: `--set extract.layers=[8,16]`).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lvlmlp.errors import LvlmlpError
from lvlmlp.report import Section, write_report

log = logging.getLogger("lvlmlp")

DEFAULTS: dict[str, Any] = {
    "name": None,  # report title; default: the config file's name
    "model": None,  # hub id or local folder of the VLM
    "device": "auto",
    "dtype": "auto",
    "raw_prompt": False,
    "task": "jsonl",
    "data_root": None,
    "image_root": None,
    "task_options": {},
    "prompt": None,  # None (contract default), a style of tasks/prompts.yaml, a "{question}" template, or a list
    "splits": {"train": "train", "test": "test"},  # or {"cv": 10, "split": "testmini"}
    "limit": None,  # seeded random N rows per split
    "per_class": None,
    "seed": 0,
    "batch_size": 8,
    "extract": {"max_new_tokens": 0, "hidden": False, "layers": [], "store_dtype": "float16", "on_error": "fail"},
    "probe": {"kind": "logistic"},
    "baselines": [],
    "clip": None,  # {"model": ..., "kinds": [image, text, concat], "batch_size": 16}
    "analyses": {"token_decay": True, "layer_sweep": True},
    "n_boot": 1000,
    "out": None,
    "finetune": None,  # {"epochs": 3, "lr": 2e-4, "answers": "Yes,No", ...}: finetuning vs probing (`_finetune_section`)
}
_OPEN_SECTIONS = {"task_options", "probe", "clip", "finetune"}  # free-form dictionaries (checked by their consumers)
_CLIP_DEFAULTS: dict[str, Any] = {"model": None, "kinds": ["image", "text", "concat"], "batch_size": 16}


# ------------------------------------------------------------------------------------------------ configuration
def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` over `DEFAULTS`: unknown keys are refused (a typo must not silently fall back to a default);
    `splits` is replaced whole, the other fixed sections are merged key by key."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key not in DEFAULTS:
            raise LvlmlpError(f"config: unknown key {key!r} (keys: {', '.join(DEFAULTS)})")
        fixed = isinstance(out.get(key), dict) and key not in _OPEN_SECTIONS and key != "splits"
        if fixed and isinstance(value, dict):
            unknown = sorted(set(value) - set(out[key]))
            if unknown:
                raise LvlmlpError(f"config: unknown key {key}.{unknown[0]!r} (keys: {', '.join(out[key])})")
            out[key] = {**out[key], **value}
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_set(items: list[str]) -> dict[str, Any]:
    """`["a.b=1", "c=[x, y]"]` -> {"a": {"b": 1}, "c": ["x", "y"]}; values are read as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise LvlmlpError(f"--set {item!r}: expected KEY=VALUE, e.g. extract.max_new_tokens=5")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise LvlmlpError(f"--set {item!r}: the value is not valid YAML") from None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise LvlmlpError(f"--set {item!r}: {part!r} is set to a value and a section at once")
        node[parts[-1]] = value
    return out


def _deep_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path, sets: list[str] = (), **flags: Any) -> dict[str, Any]:
    """The file, then `--set` overrides, then the named flags (those not None), over `DEFAULTS`; validated."""
    path = Path(path)
    if not path.is_file():
        raise LvlmlpError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise LvlmlpError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise LvlmlpError(f"{path}: the config must be a mapping of keys to values")
    raw = _deep_update(raw, parse_set(list(sets)))
    raw.update({k: v for k, v in flags.items() if v is not None})
    cfg = _merge(DEFAULTS, raw)
    cfg["name"] = cfg["name"] or path.stem
    _validate(cfg)
    return cfg


def _validate(cfg: dict[str, Any]) -> None:
    for key in ("model", "data_root", "out"):
        if not cfg[key]:
            raise LvlmlpError(f"config: {key!r} is required (in the file, or --{key.replace('_', '-')} / --set)")
    splits = cfg["splits"]
    if not isinstance(splits, dict) or not (("train" in splits and "test" in splits) or "cv" in splits):
        raise LvlmlpError("config: splits must be {train: NAME, test: NAME} or {cv: K, split: NAME}")
    if "cv" in splits and (not isinstance(splits["cv"], int) or splits["cv"] < 2):
        raise LvlmlpError(f"config: splits.cv must be an integer >= 2, got {splits['cv']!r}")
    ext = cfg["extract"]
    if not isinstance(ext["max_new_tokens"], int) or ext["max_new_tokens"] < 0:
        raise LvlmlpError(f"config: extract.max_new_tokens must be an integer >= 0, got {ext['max_new_tokens']!r}")
    if not isinstance(cfg["baselines"], list):
        raise LvlmlpError("config: baselines must be a list, e.g. [own-answer, max-prob, entropy]")
    if cfg["clip"] is not None:
        clip = {**_CLIP_DEFAULTS, **cfg["clip"]}
        unknown = sorted(set(clip) - set(_CLIP_DEFAULTS))
        if unknown or not clip["model"]:
            raise LvlmlpError(f"config: clip needs a model (keys: {', '.join(_CLIP_DEFAULTS)})")
        cfg["clip"] = clip
    if cfg["finetune"] is not None:
        _finetune_options(cfg)


def prompts_of(cfg: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(name, template) of every prompt: a style name of the task, a template with {question}, or None."""
    from lvlmlp.tasks import prompt_template

    spec = cfg["prompt"]
    items = spec if isinstance(spec, list) else [spec]
    out: list[tuple[str, str | None]] = []
    for i, item in enumerate(items):
        if item is None:
            out.append(("default", None))
        elif not isinstance(item, str):
            raise LvlmlpError(f"config: prompt entries must be strings, got {item!r}")
        elif "{question}" in item:
            out.append((f"template{i + 1}" if len(items) > 1 else "template", item))
        else:
            out.append((item, prompt_template(cfg["task"], item)))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise LvlmlpError(f"config: prompt lists the same style twice ({', '.join(names)})")
    return out


def split_names(cfg: dict[str, Any]) -> list[str]:
    s = cfg["splits"]
    if "cv" in s:
        from lvlmlp.tasks import get_task

        return [str(s.get("split") or get_task(cfg["task"]).default_split)]
    return [str(s["train"]), str(s["test"])] if s["train"] != s["test"] else [str(s["train"])]


# ------------------------------------------------------------------------------------------------ resumable steps
def _key(settings: Any) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:20]


class Steps:
    """Stamps in OUT/steps/NAME.json: a step whose stamp matches its settings' hash is done."""

    def __init__(self, out: Path) -> None:
        self.dir = out / "steps"

    def done(self, name: str, key: str) -> bool:
        path = self.dir / f"{name}.json"
        return path.is_file() and json.loads(path.read_text()).get("key") == key

    def mark(self, name: str, key: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / f"{name}.json").write_text(json.dumps({"key": key}))


class LazyBackend:
    """Loads the VLM the first time a step needs it (never, when every extraction is done already)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg, self.backend = cfg, None

    def get(self, template: str | None) -> Any:
        if self.backend is None:
            from lvlmlp import backend as backend_module

            self.backend = backend_module.Backend(self.cfg["model"], device=self.cfg["device"],
                                                  dtype=self.cfg["dtype"], raw_prompt=bool(self.cfg["raw_prompt"]))
        if template is not None and "{question}" not in template:
            raise LvlmlpError(f"prompt {template!r} has no {{question}} placeholder")
        # The template is read at each prompt() call, so one loaded model serves every prompt of the config.
        self.backend.prompt_template = template
        return self.backend


# ------------------------------------------------------------------------------------------------ the experiment
def task_rows(cfg: dict[str, Any], split: str) -> list[dict]:
    from lvlmlp.tasks import get_task

    options = dict(cfg["task_options"] or {})
    return get_task(cfg["task"]).rows(cfg["data_root"], cfg["image_root"], split, limit=cfg["limit"],
                                      per_class=cfg["per_class"], seed=cfg["seed"], **options)


def _label_fn(cfg: dict[str, Any]) -> Any:
    """MathVista: each row's label is whether the model's answer is right, stored by `extract` with the row."""
    from lvlmlp.tasks import get_task

    if not get_task(cfg["task"]).needs_generation:
        return None
    from lvlmlp.tasks.mathvista import check_answer

    return check_answer


def run_experiment(cfg: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Run every step of a validated config (see `load_config`); returns the report's metrics."""
    from lvlmlp.data import rows_fingerprint
    from lvlmlp.extract import extract, select_rows
    from lvlmlp.store import open_run

    out = Path(cfg["out"])
    steps, lazy = Steps(out), LazyBackend(cfg)
    prompts, splits = prompts_of(cfg), split_names(cfg)
    rows = {s: select_rows(task_rows(cfg, s)) for s in splits}
    ext = cfg["extract"]
    runs: dict[tuple[str, str], Any] = {}
    for name, template in prompts:
        for split in splits:
            folder = out / "runs" / f"{name}-{split}"
            key = _key({"model": cfg["model"], "dtype": cfg["dtype"], "raw_prompt": cfg["raw_prompt"],
                        "template": template, "data": rows_fingerprint(rows[split]), **ext})
            step = f"extract-{name}-{split}"
            if not (steps.done(step, key) and (folder / "manifest.json").is_file()):
                log.info("run: extracting %s (%d rows)", folder, len(rows[split]))
                extract(lazy.get(template), rows[split], folder, batch_size=cfg["batch_size"],
                        max_new_tokens=ext["max_new_tokens"], hidden=bool(ext["hidden"]),
                        layers=[int(x) for x in ext["layers"] or []], store_dtype=ext["store_dtype"],
                        on_error=ext["on_error"], source=f"task {cfg['task']} split {split}", progress=progress,
                        label_fn=_label_fn(cfg))
                steps.mark(step, key)
            runs[(name, split)] = open_run(folder)
    clip_runs = _clip_step(cfg, rows, out, progress) if cfg["clip"] else {}
    return _analyses(cfg, out, steps, prompts, splits, runs, clip_runs)


def _clip_step(cfg: dict[str, Any], rows: dict[str, list[dict]], out: Path, progress: bool) -> dict:
    from lvlmlp.clip_features import extract_clip

    clip = cfg["clip"]
    result = {}
    for split, split_rows in rows.items():
        outs = {k: out / "runs" / f"clip-{k}-{split}" for k in clip["kinds"]}
        for kind, run in extract_clip(clip["model"], split_rows, outs, batch_size=clip["batch_size"],
                                      device=cfg["device"], on_error=cfg["extract"]["on_error"],
                                      progress=progress).items():
            result[(kind, split)] = run
    return result


def _protocol(cfg: dict[str, Any], train_run: Any, test_run: Any, label_runs: tuple[Any, Any] | None = None) -> Any:
    """Train/test (or k-fold) protocol on the runs' labelled rows. `label_runs`: (train, test) VLM runs whose labels
    the feature runs take by row id (CLIP runs of a task labelled by the model's answers, MathVista)."""
    from lvlmlp.analyses import Labelled, Protocol

    def labelled(run: Any, source: Any) -> Any:
        if source is None:
            return Labelled.of(run)
        by_id = dict(zip(source.ids, source.labels))
        return Labelled.of(run, [by_id.get(i, np.nan) for i in run.ids])

    train_src, test_src = label_runs or (None, None)
    test = labelled(test_run, test_src)
    if "cv" in cfg["splits"]:
        return Protocol(test=test, cv=cfg["splits"]["cv"], seed=cfg["seed"], n_boot=cfg["n_boot"])
    train = labelled(train_run, train_src)
    return Protocol(test=test, train=train, seed=cfg["seed"], n_boot=cfg["n_boot"])


def _cached(steps: Steps, name: str, key: str, path: Path, compute: Any) -> Any:
    """The JSON result of an analysis step, recomputed only when its settings or input runs changed."""
    if steps.done(name, key) and path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    steps.mark(name, key)
    return result


def _analyses(cfg: dict[str, Any], out: Path, steps: Steps, prompts: list, splits: list[str], runs: dict,
              clip_runs: dict) -> dict[str, Any]:
    from lvlmlp import analyses as an

    train_split, test_split = splits[0], splits[-1]
    probe_cfg = dict(cfg["probe"])
    feature_kind = probe_cfg.get("feature", "logits")
    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    eval_dirs: list[Path] = []
    sections: list[Section] = []
    results: dict[str, Any] = {"config": cfg, "token_decay": {}, "layer_sweep": {}}
    main: dict[str, dict] = {}

    def stamp(*inputs: Any) -> str:
        # A result depends on its settings and on the exact runs it read (their creation times identify them).
        return _key([probe_cfg, cfg["baselines"], cfg["splits"], cfg["n_boot"], cfg["seed"],
                     [(str(r.path), r.manifest.get("created_at")) for r in inputs]])

    for name, _ in prompts:
        train_run, test_run = runs[(name, train_split)], runs[(name, test_split)]
        protocol = _protocol(cfg, train_run, test_run)
        key = stamp(train_run, test_run)
        eval_dir = out / "evals" / name
        main[name] = _cached(steps, f"eval-{name}", key, eval_dir / "metrics.json", partial(
            an.main_evaluation, protocol, an.logits_feature(0, feature_kind),
            {"kind": feature_kind, "token": 0, "model": test_run.manifest.get("model")}, probe_cfg,
            list(cfg["baselines"]), eval_dir, probe_dir=out / "probes" / name, split=test_split))
        eval_dirs.append(eval_dir)
        n_tok = min(train_run.n_logit_tokens, test_run.n_logit_tokens)
        if cfg["analyses"].get("token_decay") and n_tok > 1:
            res = _cached(steps, f"token-decay-{name}", key, out / "analyses" / f"token_decay-{name}.json",
                          partial(an.token_decay, protocol, probe_cfg))
            results["token_decay"][name] = res
            png = report_dir / f"token_decay_{name}.png"
            an.plot_token_decay(res, png, f"token-position decay: {name}")
            sections.append(Section(
                f"Token-position decay: {name}",
                f"Probe on the logits of generated token k (1 = first) and of each row's last generated token. "
                f"{res['rule']}. Rows per answer length: {res['n_tokens_histogram']}.",
                an.TOKEN_DECAY_HEADER, an.token_decay_rows(res), [png]))
        has_states = test_run.manifest.get("hidden") or test_run.manifest.get("layers")
        if cfg["analyses"].get("layer_sweep") and has_states:
            res = _cached(steps, f"layer-sweep-{name}", key, out / "analyses" / f"layer_sweep-{name}.json",
                          partial(an.layer_sweep, protocol, probe_cfg))
            results["layer_sweep"][name] = res
            png = report_dir / f"layer_sweep_{name}.png"
            ref = res["entries"][0]["value"]
            an.plot_bars([e["feature"] for e in res["entries"]], res["entries"], png, f"layer sweep: {name}", ref)
            sections.append(Section(
                f"Layer sweep: {name}",
                "Probes on hidden states at the first generated position (layer 0 = embeddings) against the "
                "first-token logits, same rows and protocol.", an.LAYER_HEADER, an.layer_rows(res), [png]))
    if len(prompts) > 1:
        sections.append(_prompt_section(main, report_dir))
        results["prompt_comparison"] = {n: _headline(m) for n, m in main.items()}
    if clip_runs:
        # CLIP rows carry no answers: where labels come from the model's answers, take them from the first prompt's runs.
        label_runs = (runs[(prompts[0][0], splits[0])], runs[(prompts[0][0], splits[-1])]) if _label_fn(cfg) else None
        sections.append(_clip_evals(cfg, out, steps, clip_runs, splits, main[prompts[0][0]], eval_dirs, results,
                                    report_dir, stamp, label_runs))
    if cfg["finetune"] is not None:
        sections.append(_finetune_section(cfg, out, steps, prompts[0], splits, runs, report_dir, results))
    return write_report(eval_dirs, report_dir, sections, results)


def _finetune_options(cfg: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The `finetune:` section as (`lvlmlp.finetune.Settings`, comparison options), checked (also at load time)."""
    from dataclasses import fields

    from lvlmlp.finetune import Settings

    spec = dict(cfg["finetune"] or {})
    extra = {"answers": None, "max_new_tokens": 3, "every_epoch": True}
    known = [f.name for f in fields(Settings)] + list(extra)
    unknown = sorted(set(spec) - set(known))
    if unknown:
        raise LvlmlpError(f"config: unknown key finetune.{unknown[0]!r} (keys: {', '.join(known)})")
    if "cv" in cfg["splits"] or _label_fn(cfg):
        raise LvlmlpError("config: finetune needs splits {train, test} and labels that do not come from answers")
    opts = {**extra, **{k: spec.pop(k) for k in list(spec) if k in extra}}
    spec.setdefault("seed", cfg["seed"])
    targets = spec.get("target_modules")
    if isinstance(targets, str | list):  # "q_proj,v_proj" or [q_proj, v_proj]
        spec["target_modules"] = tuple(t.strip() for t in (targets.split(",") if isinstance(targets, str)
                                                           else map(str, targets)) if t.strip())
    settings = Settings(**spec)
    settings.check()
    return settings, opts


def _finetune_section(cfg: dict[str, Any], out: Path, steps: Steps, prompt: tuple[str, str | None],
                      splits: list[str], runs: dict, report_dir: Path, results: dict[str, Any]) -> Any:
    """`finetune:` LoRA-finetune the model on the train split (first prompt) and compare it with the probe on the
    base model's first-token logits, on the test split: table + AUROC per epoch (`lvlmlp.finetune.compare`)."""
    from lvlmlp import finetune as ft
    from lvlmlp.extract import select_rows

    settings, opts = _finetune_options(cfg)
    name, template = prompt
    answers = ft.parse_answers(opts["answers"]) or ft.default_answers(cfg["task"], name)
    train_rows, test_rows = (select_rows(task_rows(cfg, s)) for s in (splits[0], splits[-1]))
    targets = ft.row_targets(train_rows, answers, f"task {cfg['task']} split {splits[0]}")
    base_train, base_test = runs[(name, splits[0])], runs[(name, splits[-1])]

    def compute() -> dict[str, Any]:
        y_train = np.array([r["label"] for r in train_rows], dtype=float)
        base = ft.probe_scores(ft.first_token_logits(base_train, train_rows), y_train,
                               ft.first_token_logits(base_test, test_rows))
        return ft.compare(cfg["model"], train_rows, test_rows, targets, out / "finetune", settings,
                          ft.readout_for(answers), base, device=cfg["device"], dtype=cfg["dtype"],
                          prompt_template=template, raw_prompt=bool(cfg["raw_prompt"]),
                          max_new_tokens=int(opts["max_new_tokens"]), batch_size=cfg["batch_size"],
                          every_epoch=bool(opts["every_epoch"]), n_boot=cfg["n_boot"])

    key = _key([settings, opts, template, cfg["n_boot"], [(str(r.path), r.manifest.get("created_at"))
                                                          for r in (base_train, base_test)]])
    res = _cached(steps, "finetune", key, out / "finetune" / "comparison.json", compute)
    results["finetune"] = res
    png = report_dir / "finetune_epochs.png"
    ft.plot_epochs(res, png, f"finetuned vs probe: {name}")
    return Section("Finetuning vs probing",
                   f"LoRA on the language model ({settings.epochs} epochs, rank {settings.lora_rank}, lr "
                   f"{settings.lr}) on the {len(train_rows)} train rows, targets {answers or 'per row'}, prompt "
                   f"{name}; test split: the finetuned model's own answer and answer-token probability "
                   f"('{res['readout_token']}') against the probe on the base and on the finetuned model's "
                   "first-token logits. Plot: AUROC per epoch.", ft.COMPARISON_HEADER, ft.comparison_rows(res), [png])


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    metric = "auroc" if metrics.get("task") == "binary" else "accuracy"
    return {"metric": metric, "value": metrics.get(metric), "ci": metrics.get(f"{metric}_ci"),
            "n": metrics.get("n", metrics.get("n_scored")),
            "baselines": {b: m.get("auroc") for b, m in (metrics.get("baselines") or {}).items()}}


def _prompt_section(main: dict[str, dict], report_dir: Path) -> Any:
    from lvlmlp import analyses as an
    from lvlmlp.report import fmt_pct

    names = list(main)
    heads = [_headline(main[n]) for n in names]
    baselines = sorted({b for h in heads for b in h["baselines"]})
    rows = [[n, an.fmt_result(h), *[fmt_pct(h["baselines"].get(b)) for b in baselines], str(h["n"])]
            for n, h in zip(names, heads)]
    png = report_dir / "prompt_comparison.png"
    an.plot_bars(names, heads, png, "probe by prompt")
    return Section("Prompt comparison", "The same task and rows under each prompt: the first-token probe "
                      "and the baselines' AUROC.", ["prompt", "probe [95% CI]", *baselines, "n"], rows, [png])


def _clip_evals(cfg, out, steps, clip_runs, splits, first, eval_dirs, results, report_dir, stamp,
                label_runs=None) -> Any:
    from lvlmlp import analyses as an

    probe_cfg = {k: v for k, v in cfg["probe"].items() if k != "feature"}
    rows = [["first-token logits (" + str(first.get("probe", {}).get("class")) + ")", an.fmt_result(_headline(first)),
             str(_headline(first)["n"])]]
    entries, names = [_headline(first)], ["first-token logits"]
    results["clip"] = {}
    for kind in cfg["clip"]["kinds"]:
        train_run, test_run = clip_runs[(kind, splits[0])], clip_runs[(kind, splits[-1])]
        protocol = _protocol(cfg, train_run, test_run, label_runs)
        eval_dir = out / "evals" / f"clip-{kind}"
        metrics = _cached(steps, f"eval-clip-{kind}", stamp(train_run, test_run), eval_dir / "metrics.json",
                          partial(an.main_evaluation,
                                  protocol, an.state_feature("hidden"),
                                  {"kind": "hidden", "token": 0, "model": cfg["clip"]["model"]}, probe_cfg, [],
                                  eval_dir, probe_dir=out / "probes" / f"clip-{kind}", split=splits[-1]))
        eval_dirs.append(eval_dir)
        head = _headline(metrics)
        results["clip"][kind] = head
        entries.append(head)
        names.append(f"CLIP {kind}")
        rows.append([f"CLIP {kind} ({cfg['clip']['model']})", an.fmt_result(head), str(head["n"])])
    png = report_dir / "clip_baseline.png"
    an.plot_bars(names, entries, png, "first-token logits vs CLIP features", entries[0]["value"])
    return Section("CLIP feature baseline", "Probes of the same kind on CLIP/SigLIP image, question-text and "
                      "concatenated embeddings, same rows and protocol.", ["features", "probe [95% CI]", "n"],
                      rows, [png])


# ------------------------------------------------------------------------------------------------ command line
def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set or [], model=args.model, out=args.out, device=args.device,
                      limit=args.limit, batch_size=args.batch_size, n_boot=args.n_boot)
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    doc = run_experiment(cfg, progress=not args.no_progress)
    for name, metrics in doc["evaluations"].items():
        head = _headline(metrics)
        value = "–" if head["value"] is None else f"{head['value']:.3f}"
        print(f"{name}: {head['metric']} {value} (n={head['n']})")
    print(f"report -> {Path(cfg['out']) / 'report' / 'report.html'}")
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("run", help="run a whole experiment from a YAML config (extract, probes, report)")
    p.add_argument("config", help="experiment YAML (see configs/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any config key, repeatable: --set extract.max_new_tokens=5")
    p.add_argument("--model", help="override `model`")
    p.add_argument("--out", help="override `out`")
    p.add_argument("--device", help="override `device` (auto, cpu, cuda, cuda:N)")
    p.add_argument("--limit", type=int, help="override `limit` (seeded random N rows per split)")
    p.add_argument("--batch-size", type=int, help="override `batch_size`")
    p.add_argument("--n-boot", type=int, help="override `n_boot` (bootstrap resamples)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_run)
