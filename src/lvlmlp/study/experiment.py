"""`lvlmlp run CONFIG.yaml`: one YAML file describes an experiment of the paper; one command runs all of it.

Steps, each skipped when its output exists with the same settings (a stamp in `OUT/steps/` holds a hash of
them), so that re-running a finished config does no model work and an interrupted one resumes:

1. extraction: one run folder per prompt and split, `OUT/runs/{prompt}-{split}` (the extractor itself resumes
   a half-written run row by row);
   with `judge:`, each prompt's test run is then judged (`lvlmlp judge`, `RUN/judgments.jsonl`; it resumes by
   itself and sends nothing once every row is judged);
2. the CLIP/SigLIP baseline (`clip:`): `OUT/runs/clip-{kind}-{split}`;
3. per prompt: the probe on first-token logits against the baselines (`OUT/evals/{prompt}`, a `probe eval`
   folder, probe in `OUT/probes/{prompt}`), token-position decay and the layer sweep (`OUT/analyses/`);
   and, with `steering:`, probe-guided decoding of the test split (`OUT/analyses/steering-{prompt}.json/.jsonl`);
4. the report `OUT/report/` (metrics.json, report.md, report.html with every table and plot), always rewritten.

Command-line flags override the file: `--model`, `--out`, `--device`, `--limit`, `--batch-size`, and any key with
`--set a.b=value` (the value is read as YAML: `--set extract.layers=[8,16]`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.options import ExtractOptions, ExtractOptionsError
from lvlmlp.extraction.spec import BackendSpec
from lvlmlp.study import config
from lvlmlp.study.config import (  # noqa: F401 - the command's entry points
    ExperimentConfig,
    load_config,
    parse_set,
    prompt_style,
    prompts_of,
    split_names,
)
from lvlmlp.study.layout import RunLayout
from lvlmlp.study.report import Section, write_report
from lvlmlp.study.sections import (
    clip_section,
    finetune_section,
    headline,
    layer_sweep_section,
    pooled_note,
    prompt_section,
    signals_section,
    steering_section,
    token_decay_section,
)
from lvlmlp.study.steps import Steps, cached, step_key

log = logging.getLogger("lvlmlp")

class LazyBackend:
    """Loads the VLM the first time a step needs it (never, when every extraction is done already). One instance
    may serve several configs of the same model (`run_experiment(..., backend=)`: the demo's six analogues)."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.spec, self.backend = backend_spec(cfg), None

    def serves(self, cfg: ExperimentConfig) -> bool:
        return self.spec.loads_as(backend_spec(cfg))

    def get(self, template: str | None) -> Any:
        """The loaded model under prompt `template` (a backend of its own sharing the model: no other prompt's
        backend changes)."""
        if template is not None and "{question}" not in template:
            raise LvlmlpError(f"prompt {template!r} has no {{question}} placeholder")
        if self.backend is None:
            self.backend = self.spec.build()
        return self.backend.with_prompt_template(template)


def backend_spec(cfg: ExperimentConfig, template: str | None = None) -> BackendSpec:
    """The config's model (`model`, `device`, `dtype`, `raw_prompt`, `system_prompt`, `trust_remote_code`,
    `backend`) under prompt `template`."""
    return BackendSpec(cfg.model, device=cfg.device, dtype=cfg.dtype, prompt_template=template,
                       raw_prompt=bool(cfg.raw_prompt), system_prompt=cfg.system_prompt,
                       trust_remote_code=cfg.trust_remote_code, backend=cfg.backend)


# ------------------------------------------------------------------------------------------------ the experiment
def task_rows(cfg: ExperimentConfig, split: str) -> list[dict]:

    options = dict(cfg.task_options or {})
    return cfg.resolved_task().rows(cfg.data_root, cfg.image_root, split, limit=cfg.limit,
                                      per_class=cfg.per_class, seed=cfg.seed, **options)


def _task_header(cfg: ExperimentConfig) -> dict[str, Any]:
    """What each evaluation's header records of the task: its per-group metrics (row field -> metric) and its
    label names (the report says what label 1 means)."""

    task = cfg.resolved_task()
    return {"groups": dict(task.groups), "label_names": list(task.label_names) or None}


def run_experiment(cfg: ExperimentConfig, progress: bool = True, backend: LazyBackend | None = None) -> dict[str, Any]:
    """Run every step of a validated config (see `load_config`); returns the report's metrics. One process at a
    time works in OUT (an fcntl lock naming its holder). `backend`: a `LazyBackend` shared with other configs of
    the same model, so that it loads once (and only if some step needs it)."""
    if backend is not None and not backend.serves(cfg):
        raise LvlmlpError("run_experiment: the shared backend was made for another model or device")
    from lvlmlp.locking import locked_folder
    from lvlmlp.outputs import claim_folder

    out = claim_folder(cfg.out, "experiment", "out")  # new, empty or an `lvlmlp run` folder (its marker)
    with locked_folder(out):
        if cfg.tasks:  # several tasks of the model, each a config of its own in OUT/tasks/NAME
            from lvlmlp.study.multitask import run_tasks

            return run_tasks(cfg, progress, backend)
        return _run_steps(cfg, progress, backend or LazyBackend(cfg))


def _run_steps(cfg: ExperimentConfig, progress: bool, lazy: LazyBackend) -> dict[str, Any]:
    from lvlmlp.data import rows_fingerprint
    from lvlmlp.extraction.extract import extract, shard_rows
    from lvlmlp.extraction.store import open_run

    out = Path(cfg.out)
    _check_steering_template(cfg, lazy)
    steps = Steps(out)
    prompts, splits = prompts_of(cfg), split_names(cfg)
    rows = {s: shard_rows(task_rows(cfg, s)) for s in splits}
    ext = cfg.extract
    options = extract_options(cfg)
    runs: dict[tuple[str, str], Any] = {}
    if cfg.judge is not None:  # a missing key or a wrong endpoint is said now, not after the extraction
        from lvlmlp.judging.judge import preflight

        for name, template in prompts:
            preflight(RunLayout(out).run(name, splits[-1]), cfg.task, template, _judge_options(cfg, False))
    for name, template in prompts:
        for split in splits:
            folder = RunLayout(out).run(name, split)
            key = step_key({"model": cfg.model, "dtype": cfg.dtype, "raw_prompt": cfg.raw_prompt,
                        **({"system_prompt": cfg.system_prompt} if cfg.system_prompt else {}),
                        # only when set: the stamps of other configs stay as they were
                        **({"trust_remote_code": True} if cfg.trust_remote_code else {}),
                        **({"backend": cfg.backend} if cfg.backend else {}),
                        "template": template, "data": rows_fingerprint(rows[split]),
                        **{k: v for k, v in ext.items()
                           if (v is not None or k != "logits_tokens") and (v or k != "vision")}})
            step = f"extract-{name}-{split}"
            if not (steps.done(step, key) and (folder / "manifest.json").is_file()):
                log.info("run: extracting %s (%d rows)", folder, len(rows[split]))
                run_options = dict(source=f"task {cfg.task} split {split}", progress=progress,
                                   label_fn=cfg.resolved_task().label_fn)
                try:
                    if cfg.ray:  # the model loads in the Ray replicas, not in this process
                        from lvlmlp.extraction.ray_extract import ray_extract, ray_options

                        ray_extract(backend_spec(cfg, template), rows[split], folder, options,
                                    ray=ray_options(cfg.ray), **run_options)
                    else:
                        extract(lazy.get(template), rows[split], folder, options, **run_options)
                except ExtractOptionsError as err:  # said by the config's keys
                    raise LvlmlpError(err.named(_CONFIG_NAMES)) from None
                steps.mark(step, key)
            runs[(name, split)] = open_run(folder)
    if cfg.judge is not None:
        _judge_step(cfg, prompts, splits[-1], runs, progress)
    clip_runs = _clip_step(cfg, rows, out, progress) if cfg.clip else {}
    return _analyses(cfg, out, steps, prompts, splits, runs, clip_runs, rows, lazy, progress)


def extract_options(cfg: ExperimentConfig) -> ExtractOptions:
    """The config's extraction options (its `batch_size` and every key of its `extract:` section, each an
    `ExtractOptions` field of the same name); a bad one is said by its key."""
    try:
        return ExtractOptions(batch_size=cfg.batch_size, **dict(cfg.extract.items()))
    except ExtractOptionsError as err:
        raise LvlmlpError(err.named(_CONFIG_NAMES)) from None


# The config key of each extraction option, for its messages.
_CONFIG_NAMES = {**{f.name: f"extract.{f.name}" for f in dataclasses.fields(config.ExtractConfig)},
                 "batch_size": "batch_size"}


def _judge_step(cfg: ExperimentConfig, prompts: list[tuple[str, str | None]], test_split: str, runs: dict,
                progress: bool) -> None:
    """`judge:` each prompt's test run judged (`lvlmlp judge`); the judge itself skips the rows judged already, so a
    re-run sends nothing (and needs neither key nor endpoint) once every row is judged."""
    from lvlmlp.judging.judge import judge_run

    for name, template in prompts:
        summary = judge_run(runs[(name, test_split)].path, cfg.task, template, _judge_options(cfg, progress))
        log.info("run: %s", summary.line())


def _judge_options(cfg: ExperimentConfig, progress: bool) -> Any:
    from lvlmlp.judging.judge import JudgeOptions

    j = cfg.judge
    return JudgeOptions(endpoint=str(j.endpoint), model=j.model, api_key_env=j.api_key_env,
                        concurrency=j.concurrency, scenarios=j.scenario_templates, rounding=j.mathvista_rounding,
                        progress=progress)


def _own_labels(cfg: ExperimentConfig, run: Any) -> Any:
    """The labels a run's rows take: MathVista's from its judgments (MathVista's answer extraction) where the run
    was judged, else the run's own (None)."""
    if cfg.resolved_task().label_fn is None or cfg.task != "mathvista":
        return None
    from lvlmlp.judging.mathvista import judged_labels

    return judged_labels(run)


def _judgments_stamp(run: Any) -> tuple[str, ...]:
    """A judged run's evaluation depends on its judgments too (MathVista labels, the own-answer baselines)."""
    from lvlmlp.judging.store import JUDGMENTS_FILE

    path = Path(run.path) / JUDGMENTS_FILE
    return (hashlib.sha256(path.read_bytes()).hexdigest(),) if path.is_file() else ()


def _check_steering_template(cfg: ExperimentConfig, lazy: LazyBackend) -> None:
    """Refuse a `steering.template` the model's tokenizer cannot spell before the first step runs (the steering step
    comes last, after the extractions: a template of `<unk>` tokens would be found out only then). Only the
    tokenizer is loaded; one that cannot load is left to the extraction step to report."""
    if cfg.steering is None or not cfg.steering.template:
        return
    from lvlmlp.steering.guard import spell

    if lazy.backend is not None:
        tokenizer = lazy.backend.tokenizer
    else:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        except (OSError, ValueError, ImportError):
            return
    spell(tokenizer, cfg.steering.template, "steering.template")


def _clip_step(cfg: ExperimentConfig, rows: dict[str, list[dict]], out: Path, progress: bool) -> dict:
    from lvlmlp.extraction.clip_features import extract_clip

    clip = cfg.clip
    result = {}
    for split, split_rows in rows.items():
        outs = {k: RunLayout(out).clip_run(k, split) for k in clip.kinds}
        for kind, run in extract_clip(clip.model, split_rows, outs, batch_size=clip.batch_size,
                                      device=cfg.device, on_error=cfg.extract.on_error,
                                      progress=progress).items():
            result[(kind, split)] = run
    return result


def _protocol(cfg: ExperimentConfig, train_run: Any, test_run: Any, label_runs: tuple[Any, Any] | None = None) -> Any:
    """Train/test (or k-fold) protocol on the runs' labelled rows. `label_runs`: (train, test) VLM runs whose labels
    the feature runs take by row id (CLIP runs of a task labelled by the model's answers, MathVista)."""
    from lvlmlp.study.analyses import Labelled, Protocol

    def labelled(run: Any, source: Any) -> Any:
        if source is None:
            return Labelled.of(run, _own_labels(cfg, run))
        own = _own_labels(cfg, source)
        by_id = dict(zip(source.ids, source.labels if own is None else own))
        return Labelled.of(run, [by_id.get(i, np.nan) for i in run.ids])

    train_src, test_src = label_runs or (None, None)
    test = labelled(test_run, test_src)
    if cfg.splits.cv is not None:
        return Protocol(test=test, cv=cfg.splits.cv, cv_shuffle=cfg.splits.shuffle, seed=cfg.seed, n_boot=cfg.n_boot)
    train = labelled(train_run, train_src)
    return Protocol(test=test, train=train, seed=cfg.seed, n_boot=cfg.n_boot)


def _analyses(cfg: ExperimentConfig, out: Path, steps: Steps, prompts: list, splits: list[str], runs: dict,
              clip_runs: dict, rows: dict[str, list[dict]], lazy: LazyBackend, progress: bool = True
              ) -> dict[str, Any]:
    from lvlmlp.study import analyses as an

    train_split, test_split = splits[0], splits[-1]
    probe_cfg = dict(cfg.probe)
    feature_kind = cfg.probe.feature
    report_dir = RunLayout(out).report
    report_dir.mkdir(parents=True, exist_ok=True)
    eval_dirs: list[Path] = []
    sections: list[Section] = []
    results: dict[str, Any] = {"config": cfg.to_dict(), "token_decay": {}, "layer_sweep": {}}
    main: dict[str, dict] = {}

    def stamp(*inputs: Any) -> str:
        # A result depends on its settings and on the exact runs it read (their creation times identify them).
        return step_key([probe_cfg, cfg.baselines, cfg.splits, cfg.n_boot, cfg.seed,
                     [(str(r.path), r.manifest.get("created_at"), *_judgments_stamp(r)) for r in inputs]])

    for name, template in prompts:
        train_run, test_run = runs[(name, train_split)], runs[(name, test_split)]
        protocol = _protocol(cfg, train_run, test_run)
        key = stamp(train_run, test_run)
        eval_dir = RunLayout(out).eval(name)
        main[name] = cached(steps, f"eval-{name}", key, eval_dir / "metrics.json", partial(
            an.main_evaluation, protocol, an.logits_feature(0, feature_kind),
            {"kind": feature_kind, "token": 0, "model": test_run.manifest.get("model")}, probe_cfg,
            list(cfg.baselines), eval_dir, probe_dir=RunLayout(out).probe(name), split=test_split,
            task=_task_header(cfg), task_name=cfg.task, prompt_style=prompt_style(cfg, name)))
        eval_dirs.append(eval_dir)
        n_tok = min(train_run.n_logit_tokens, test_run.n_logit_tokens)
        pooled = pooled_note(cfg.splits.cv)
        n_boot = cfg.analyses.n_boot
        # The analyses' intervals may take fewer resamples; the first-token probe is still fitted once.
        analysis_protocol = protocol if n_boot is None else protocol.with_n_boot(n_boot)
        analysis_key = key if n_boot is None else step_key([key, n_boot])
        if cfg.analyses.token_decay and n_tok > 1:
            res = cached(steps, f"token-decay-{name}", analysis_key, RunLayout(out).analysis("token_decay", name),
                         partial(an.token_decay, analysis_protocol, probe_cfg))
            results["token_decay"][name] = res
            sections.append(token_decay_section(name, res, report_dir, pooled))
        has_states = test_run.manifest.get("hidden") or test_run.manifest.get("layers")
        if cfg.analyses.layer_sweep and has_states:
            res = cached(steps, f"layer-sweep-{name}", analysis_key, RunLayout(out).analysis("layer_sweep", name),
                         partial(an.layer_sweep, analysis_protocol, probe_cfg))
            results["layer_sweep"][name] = res
            sections.append(layer_sweep_section(name, res, report_dir, pooled))
        if cfg.steering is not None:
            res = cached(steps, f"steering-{name}", step_key([key, cfg.steering, cfg.extract.max_new_tokens,
                                                           cfg.batch_size]),
                         RunLayout(out).analysis("steering", name),
                         partial(_steering, cfg, out, lazy, (name, template), rows[test_split], test_run, progress))
            results.setdefault("steering", {})[name] = res
            sections.append(steering_section(name, res))
        if cfg.signals is not None:
            sections.append(_signals_section(cfg, out, steps, (name, template), protocol, rows[test_split],
                                             step_key([key, cfg.signals, n_boot]), lazy, report_dir, results))
    if len(prompts) > 1:
        sections.append(prompt_section(main, report_dir))
        results["prompt_comparison"] = {n: headline(m) for n, m in main.items()}
    if clip_runs:
        # CLIP rows carry no answers: where labels come from the model's answers, take them from the first prompt's runs.
        label_runs = (runs[(prompts[0][0], splits[0])], runs[(prompts[0][0], splits[-1])]) if cfg.resolved_task().label_fn else None
        sections.append(_clip_evals(cfg, out, steps, clip_runs, splits, main[prompts[0][0]], eval_dirs, results,
                                    report_dir, stamp, label_runs))
    if cfg.finetune is not None:
        sections.append(_finetune_section(cfg, out, steps, finetune_prompt(cfg, prompts), splits, rows, runs,
                                          report_dir, results))
    return write_report(eval_dirs, report_dir, sections, results, task=cfg.task)


def _steering(cfg: ExperimentConfig, out: Path, lazy: LazyBackend, prompt: tuple[str, str | None],
              test_rows: list[dict], test_run: Any, progress: bool) -> dict[str, Any]:
    """`steering:` probe-guided decoding of the labelled test rows with the main evaluation's probe; every row's
    score, flag and both answers go to `OUT/analyses/steering-{prompt}.jsonl`, so the counts recompute."""
    from lvlmlp.data import write_jsonl
    from lvlmlp.extraction.protocol import check_guidable
    from lvlmlp.probing.probes import load_probe
    from lvlmlp.steering.guard import guided_decoding

    name, template = prompt
    backend = lazy.get(template)
    check_guidable(backend)  # a `backend:` class without its torch `model`: said before any decoding
    labels = {i: lab for i, lab in zip(test_run.ids, test_run.labels) if not np.isnan(lab)}
    rows = [r for r in test_rows if r["id"] in labels]
    log.info("run: probe-guided decoding of %d %s rows", len(rows), name)
    summary, records = guided_decoding(
        backend, load_probe(RunLayout(out).probe(name)), rows, dict(zip(test_run.ids, test_run.responses)),
        # threshold None: the saved probe's own, the one the evaluation used
        {i: int(lab) for i, lab in labels.items()}, cfg.steering.template, cfg.steering.threshold,
        max_new_tokens=cfg.extract.max_new_tokens, batch_size=cfg.batch_size, progress=progress)
    RunLayout(out).analyses.mkdir(parents=True, exist_ok=True)  # absent when no other analysis ran
    write_jsonl(RunLayout(out).analysis("steering", name, ".jsonl"), records)
    return summary


def _signals_section(cfg: ExperimentConfig, out: Path, steps: Steps, prompt: tuple[str, str | None], protocol: Any,
                     test_rows: list[dict], key: str, lazy: LazyBackend, report_dir: Path,
                     results: dict[str, Any]) -> Any:
    """`signals:` the *Which signal?* table and plot of one prompt (`lvlmlp.study.signals`); the model is loaded
    only to time it, once (a re-run reads the cached result)."""
    from lvlmlp.study import signals as sg

    name, template = prompt
    signals = sg.parse_signals(cfg.signals.probes, cfg.signals.baselines)
    n_boot = cfg.analyses.n_boot
    protocol = protocol if n_boot is None else protocol.with_n_boot(n_boot)

    def compute() -> dict[str, Any]:
        test_run = protocol.test.run
        labelled = {test_run.ids[int(i)] for i in protocol.test.idx}
        timed = [r for r in test_rows if r["id"] in labelled][: cfg.signals.timing_rows]
        timing = None
        if timed and not cfg.ray:  # on Ray the model is not in this process: no timing (said in the report)
            layers = [int(x) for x in test_run.manifest.get("layers") or []]
            work = {sg.model_work(s, test_run) for s in signals}
            timing = sg.model_timing(lazy.get(template), timed, layers, work)
        p_true = None
        if any(s.kind == sg.P_TRUE for s in signals):  # the self-evaluation pass of every labelled test row
            import time

            from lvlmlp.probing.p_true import p_true_scores

            by_id = {r["id"]: r for r in test_rows}
            rows = [by_id[test_run.ids[int(i)]] for i in protocol.test.idx]
            backend = lazy.get(template)
            start = time.perf_counter()
            scores = p_true_scores(backend, rows, dict(zip(test_run.ids, test_run.responses)), cfg.batch_size)
            p_true = {"scores": scores, "seconds_per_row": (time.perf_counter() - start) / max(len(rows), 1)}
        return sg.which_signal(protocol, signals, timing, RunLayout(out).analysis("signals", name, ".jsonl"), cfg.task,
                               p_true)

    res = cached(steps, f"signals-{name}", key, RunLayout(out).analysis("signals", name), compute)
    results.setdefault("signals", {})[name] = res
    return signals_section(name, res, report_dir)


def finetune_prompt(cfg: ExperimentConfig, prompts: list[tuple[str, str | None]]) -> tuple[str, str | None]:
    """The prompt the `finetune:` section trains and evaluates under: the style the paper evaluated its finetuned
    model with for the task (`finetune.paper_style`: `mq` for VizWiz, MM-SafetyBench, MAD; `oe` for POPE) when the
    config has it, else the first prompt."""
    from lvlmlp.study.finetune import paper_style

    style = paper_style(cfg.task)
    return next((p for p in prompts if prompt_style(cfg, p[0]) == style), prompts[0])


def _finetune_section(cfg: ExperimentConfig, out: Path, steps: Steps, prompt: tuple[str, str | None],
                      splits: list[str], rows: dict[str, list[dict]], runs: dict, report_dir: Path,
                      results: dict[str, Any]) -> Any:
    """`finetune:` LoRA-finetune the model on the train split (`finetune_prompt`) and compare it with the probe on the
    base model's first-token logits, on the test split: table + AUROC per epoch (`lvlmlp.study.finetune.compare`)."""
    from lvlmlp.steering.guard import parse_answers
    from lvlmlp.study import analyses as an
    from lvlmlp.study import finetune as ft

    settings, opts = cfg.finetune.settings(cfg.seed), cfg.finetune.comparison()
    name, template = prompt
    # "default": the task's default style; a custom template ("template") has no answer words
    answers = parse_answers(opts["answers"]) or ft.default_answers(cfg.task, None if name == "default" else name)
    train_rows, test_rows = rows[splits[0]], rows[splits[-1]]  # the rows the extraction steps ran
    targets = ft.row_targets(train_rows, answers, f"task {cfg.task} split {splits[0]}")
    base_train, base_test = runs[(name, splits[0])], runs[(name, splits[-1])]

    def compute() -> dict[str, Any]:
        # The configured probe (kind, feature, hyper-parameters), as in the main evaluation.
        kind = cfg.probe.feature
        y_train = np.array([r["label"] for r in train_rows], dtype=int)
        make = an.make_probe_factory(dict(cfg.probe))
        probe = make().fit(ft.first_token_logits(base_train, train_rows, kind), y_train)
        base = probe.predict_proba(ft.first_token_logits(base_test, test_rows, kind))[:, 1]
        return ft.compare(cfg.model, train_rows, test_rows, targets, RunLayout(out).finetune, settings,
                          ft.readout_for(answers), base, device=cfg.device, dtype=cfg.dtype,
                          prompt_template=template, raw_prompt=bool(cfg.raw_prompt),
                          system_prompt=cfg.system_prompt, max_new_tokens=int(opts["max_new_tokens"]),
                          batch_size=cfg.batch_size, every_epoch=bool(opts["every_epoch"]), n_boot=cfg.n_boot,
                          probe_threshold=float(probe.threshold), make_probe=make)

    key = step_key([settings, opts, template, cfg.n_boot, dict(cfg.probe),
                [(str(r.path), r.manifest.get("created_at")) for r in (base_train, base_test)]])
    res = cached(steps, "finetune", key, RunLayout(out).finetune / "comparison.json", compute)
    results["finetune"] = res
    return finetune_section(name, res, settings, len(train_rows), answers, report_dir)


def _clip_evals(cfg, out, steps, clip_runs, splits, first, eval_dirs, results, report_dir, stamp,
                label_runs=None) -> Any:
    from lvlmlp.study import analyses as an

    probe_cfg = {k: v for k, v in cfg.probe.items() if k != "feature"}
    results["clip"] = {}
    for kind in cfg.clip.kinds:
        train_run, test_run = clip_runs[(kind, splits[0])], clip_runs[(kind, splits[-1])]
        protocol = _protocol(cfg, train_run, test_run, label_runs)
        eval_dir = RunLayout(out).eval(f"clip-{kind}")
        metrics = cached(steps, f"eval-clip-{kind}", stamp(train_run, test_run), eval_dir / "metrics.json",
                         partial(an.main_evaluation,
                                 protocol, an.state_feature("hidden"),
                                 {"kind": "hidden", "token": 0, "model": cfg.clip.model}, probe_cfg, [],
                                 eval_dir, probe_dir=RunLayout(out).probe(f"clip-{kind}"), split=splits[-1],
                                 task=_task_header(cfg)))
        eval_dirs.append(eval_dir)
        results["clip"][kind] = headline(metrics)
    return clip_section(first, results["clip"], cfg.clip.model, report_dir)
