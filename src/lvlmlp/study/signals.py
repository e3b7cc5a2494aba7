"""*Which signal?* (issue 30): several signals scored on the same test rows under the same protocol, each against the
paper's first-token logistic probe (paired: DeLong's test), with what each costs, measured in the same run.

A signal is either a (feature, probe) pair of the `signals.probes` list, e.g. `{feature: multi-token, tokens: 3,
probe: mtre}` or `{feature: layer, layer: 8, probe: mlp, hidden: [64]}` (keys other than feature / probe / token /
layer / tokens are the probe's hyper-parameters), or a baseline of `signals.baselines` (`seq-prob`, `max-prob`, any
name `probe eval --baseline` takes). The reference, always first, is the paper's probe: `LogisticProbe()` with its
defaults (scikit-learn's `LogisticRegression()`) on the raw logits of the first generated token.

Every labelled test row's score of every signal goes to `OUT/analyses/signals-{prompt}.jsonl` (null where the signal
has no feature for the row), so each AUROC, interval and DeLong p of the table recomputes from that file.

Costs, per row: forward passes of the model before the signal is known (1 = the prefill that also gives the first
token; token k needs k more decoding steps; sequence estimators need the answer's stored tokens), `extra` = those
beyond the first-token probe's one; seconds = model seconds (the model work the signal needs, `model_work`, timed by
itself on `timing_rows` test rows in this run: a prefill, a prefill returning hidden states or vision features, or a
greedy generation of its K tokens; P(True) adds its own pass, timed on every test row) + the measured seconds to
read the stored features and score them; bytes = what the run stores for the signal (the arrays it reads, in their
stored dtype).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lvlmlp.errors import LvlmlpError

REFERENCE = "paper: logistic on first-token logits"
P_TRUE = "p-true"  # lvlmlp.probing.p_true.NAME (not imported here: that module imports torch when it runs)
_ENTRY_KEYS = ("feature", "probe", "token", "layer", "tokens")
_SEQUENCE_ANSWER = ("seq-prob", "mean-entropy", "perplexity")
REPEATS = 3  # model timings: the fastest of this many runs


@dataclass
class Signal:
    """One row of the *Which signal?* table: a probe on a feature, or a baseline score."""

    name: str
    kind: str  # "probe", "baseline" or "p-true"
    feature: str = "logits"
    token: int = 0
    layer: int | None = None
    tokens: int | None = None
    probe: dict[str, Any] = field(default_factory=dict)  # {"kind": ..., hyper-parameters}
    baseline: str | None = None


def parse_signals(probes: list[dict[str, Any]], baselines: list[str]) -> list[Signal]:
    """The reference and the configured signals, each checked (config errors name `signals.probes[i]`)."""
    from lvlmlp.defaults import FEATURE_KINDS
    from lvlmlp.probing.baselines import check_baseline_name
    from lvlmlp.study.analyses import make_probe_factory

    out = [Signal(REFERENCE, "probe", probe={"kind": "logistic"})]
    for i, entry in enumerate(probes):
        where = f"config: signals.probes[{i}]"
        feature = entry.get("feature")
        if feature not in FEATURE_KINDS:
            raise LvlmlpError(f"{where}: feature {feature!r}: choose from {', '.join(FEATURE_KINDS)}")
        ints = {k: entry.get(k) for k in ("token", "layer", "tokens")}
        for key, value in ints.items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise LvlmlpError(f"{where}: {key}: expected an integer, got {value!r}")
        if feature == "layer" and ints["layer"] is None:
            raise LvlmlpError(f"{where}: feature layer needs layer: L")
        if feature == "multi-token" and (ints["tokens"] is None or ints["tokens"] < 1):
            raise LvlmlpError(f"{where}: feature multi-token needs tokens: K (1 or more)")
        if feature != "multi-token" and ints["tokens"] is not None:
            raise LvlmlpError(f"{where}: tokens applies to feature multi-token only")
        token = int(ints["token"] or 0)
        if token < 0:
            raise LvlmlpError(f"{where}: token: must be >= 0, got {token}")
        probe = {"kind": str(entry.get("probe", "logistic")),
                 **{k: v for k, v in entry.items() if k not in _ENTRY_KEYS}}
        if probe["kind"] == "mtre":  # MTRE splits the K tokens' columns itself: it is told K
            if feature != "multi-token":
                raise LvlmlpError(f"{where}: probe mtre reads feature multi-token (with tokens: K)")
            probe["tokens"] = ints["tokens"]
        try:
            make_probe_factory(probe)
        except LvlmlpError as err:
            raise LvlmlpError(f"{where}: {err}") from None
        if feature == "multi-token":
            what = f"multi-token ({ints['tokens']} tokens)"
        elif feature == "layer":
            what = f"layer {ints['layer']}"
        elif feature == "hidden":
            what = "hidden (final norm)"
        elif feature == "vision":
            what = "vision (mean-pooled)"
        else:
            what = f"{feature} (token {token})"
        out.append(Signal(f"{probe['kind']} on {what}", "probe", feature, token, ints["layer"], ints["tokens"],
                          probe))
    for i, name in enumerate(baselines):
        if name == P_TRUE:  # a second pass of the model, computed by the experiment (`probing.p_true`)
            out.append(Signal(name, P_TRUE, baseline=name))
            continue
        try:
            check_baseline_name(name)
        except LvlmlpError as err:
            raise LvlmlpError(f"config: signals.baselines[{i}]: {err}; or {P_TRUE}") from None
        out.append(Signal(name, "baseline", baseline=name))
    names = [s.name for s in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise LvlmlpError(f"config: signals: {dup!r} is listed twice")
    return out


# ------------------------------------------------------------------------------------------------ features, costs
def _feature(signal: Signal) -> Any:
    from lvlmlp.study import analyses as an

    if signal.feature in ("hidden", "layer", "vision"):
        return an.state_feature(signal.feature, signal.layer)
    if signal.feature == "multi-token":
        return _multi_token_feature(int(signal.tokens or 1))
    return an.logits_feature(signal.token, signal.feature)


def _multi_token_feature(tokens: int) -> Any:
    from lvlmlp.probing.features import MULTI_TOKEN, feature_matrix, valid_rows

    def get(run: Any, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = valid_rows(run, MULTI_TOKEN)[idx]
        return keep, feature_matrix(run, MULTI_TOKEN, rows=idx[keep], tokens=tokens)

    get.key = ("multi-token", tokens)  # type: ignore[attr-defined]
    return get


def forward_passes(signal: Signal, run: Any, idx: np.ndarray) -> float:
    """Mean forward passes per row before the signal is known (1: the prefill that gives the first token)."""
    n_tokens = np.asarray(run.n_tokens)[idx]
    if signal.kind == "probe":
        if signal.feature in ("hidden", "layer", "vision"):  # vision: the encoder alone, counted as the prefill
            return 1.0
        if signal.feature == "multi-token":
            return float(np.mean(np.clip(n_tokens, 1, signal.tokens)))
        return float(signal.token + 1)
    name = str(signal.baseline)
    if signal.kind == P_TRUE:  # the whole answer, then one prefill of the self-evaluation question
        return float(np.mean(np.maximum(n_tokens, 1))) + 1.0
    if name in _SEQUENCE_ANSWER:
        return float(np.mean(np.clip(n_tokens, 1, run.n_logit_tokens)))
    if name.startswith("own-answer"):  # the whole (stored) answer is read
        return float(np.mean(np.maximum(n_tokens, 1)))
    return 1.0  # max-prob, entropy, token-prob: the first token's distribution


def bytes_per_row(signal: Signal, run: Any, idx: np.ndarray) -> float:
    """Bytes per row the run stores for what the signal reads (its arrays' stored dtype)."""
    logits = run.logits(0)
    token_bytes = int(logits.shape[1]) * logits.dtype.itemsize
    if signal.kind == "probe":
        if signal.feature in ("hidden", "vision"):
            h = run.hidden() if signal.feature == "hidden" else run.vision()
            return float(h.shape[1] * h.dtype.itemsize)
        if signal.feature == "layer":
            h = run.layer(int(signal.layer))  # type: ignore[arg-type]
            return float(h.shape[1] * h.dtype.itemsize)
        if signal.feature == "multi-token":
            return float(int(signal.tokens or 1) * token_bytes + 4)  # + the int32 n_tokens
        return float(token_bytes)
    name = str(signal.baseline)
    if name in _SEQUENCE_ANSWER:
        return float(run.n_logit_tokens * token_bytes + 4)
    if name.startswith("own-answer") or signal.kind == P_TRUE:  # the answer's text (P(True) stores nothing more)
        responses = run.responses
        return float(np.mean([len((responses[i] or "").encode()) for i in idx])) if len(idx) else 0.0
    return float(token_bytes)


def model_work(signal: Signal, run: Any) -> str | int:
    """The model work a signal needs before it is known, as timed by `model_timing`: "prefill" (the first token's
    logits), "prefill_states" (a prefill that also returns the hidden states), "prefill_vision" (a prefill that also
    keeps the vision features), or K >= 2: a greedy generation of K tokens (token K-1's logits, the first K tokens, the
    stored answer). P(True) also needs its own pass, timed on every test row by the experiment."""
    answer = max(int(run.manifest.get("max_new_tokens") or 0), 1)
    if signal.kind == "probe":
        if signal.feature in ("hidden", "layer"):
            return "prefill_states"
        if signal.feature == "vision":
            return "prefill_vision"
        k = int(signal.tokens or 1) if signal.feature == "multi-token" else signal.token + 1
    elif signal.kind == P_TRUE or str(signal.baseline).startswith("own-answer"):
        k = answer  # the whole answer
    elif signal.baseline in _SEQUENCE_ANSWER:
        k = min(run.n_logit_tokens, answer)  # the stored tokens
    else:
        k = 1  # max-prob, entropy, token-prob: the first token's distribution
    return "prefill" if k <= 1 else k


def model_timing(backend: Any, rows: list[dict], layers: list[int], work: set[str | int]) -> dict[str, Any]:
    """Measured seconds per row of each model work in `work` (`model_work`: prefills, generations of K tokens) on
    `rows` (one batch, after one untimed warm-up), each timed by itself, the fastest of `REPEATS` runs, so that
    another process's burst on a shared machine is not charged to a signal."""
    import torch

    from lvlmlp.data import load_image

    images = [load_image(r["image"], r["id"]) for r in rows]
    batch = backend.encode(images, [r["question"] for r in rows])

    def timed(fn: Callable[[], Any]) -> float:
        best = math.inf
        for _ in range(REPEATS):
            if backend.device.type == "cuda":
                torch.cuda.synchronize(backend.device)
            start = time.perf_counter()
            fn()
            if backend.device.type == "cuda":
                torch.cuda.synchronize(backend.device)
            best = min(best, time.perf_counter() - start)
        return best

    backend.prefill(batch)  # warm-up: first-call allocations are no cost of any signal
    n = len(rows)
    out: dict[str, Any] = {"rows": n, "prefill": timed(lambda: backend.prefill(batch)) / n, "generate": {}}
    if "prefill_states" in work:
        out["prefill_states"] = timed(lambda: backend.prefill(batch, hidden=True, layers=layers)) / n
    if "prefill_vision" in work:
        out["prefill_vision"] = timed(lambda: backend.prefill(batch, vision=True)) / n
    for k in sorted(w for w in work if isinstance(w, int)):  # JSON keys: the token counts as strings
        out["generate"][str(k)] = timed(lambda k=k: backend.generate(batch, max_new_tokens=k)) / n
    return out


def timed_seconds(timing: dict[str, Any], work: str | int) -> float | None:
    """The measured seconds per row of one model work (None: not timed)."""
    return timing["generate"].get(str(work)) if isinstance(work, int) else timing.get(work)


# ------------------------------------------------------------------------------------------------ the analysis
def which_signal(protocol: Any, signals: list[Signal], timing: dict[str, Any] | None, scores_path: Path,
                 task_name: str | None = None, p_true: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every signal's scores on the protocol's labelled test rows (written to `scores_path`), its AUROC with a
    bootstrap interval, DeLong's test against the reference (signals[0]) on the rows both score, and its costs.
    `p_true`: {"scores": P(Yes) of the test rows in `protocol.test.idx` order, "seconds_per_row": measured}."""
    from lvlmlp.data import write_jsonl
    from lvlmlp.probing.baselines import baseline_scores
    from lvlmlp.study.analyses import make_probe_factory

    test = protocol.test
    if np.unique(test.y).size != 2:
        return {"note": "Which signal? compares binary tasks (AUROC) only", "signals": []}
    by_row = {int(i): k for k, i in enumerate(test.idx)}
    scores: dict[str, np.ndarray] = {}
    notes: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for signal in signals:
        column = np.full(test.idx.size, np.nan)
        try:
            if signal.kind == "probe":
                feature, make = _feature(signal), make_probe_factory(signal.probe)
                scored = protocol.score(feature, make)
                if scored.score.ndim != 1:
                    raise LvlmlpError("a multiclass probe has no AUROC")
                # the readout alone: read the test rows' features and score them (k-fold has no single probe:
                # reading the features only)
                start = time.perf_counter()
                _, X = feature(test.run, test.idx)
                if scored.probe is not None:
                    scored.probe.predict_proba(X)
                seconds[signal.name] = (time.perf_counter() - start) / max(test.idx.size, 1)
                column[[by_row[int(r)] for r in scored.rows]] = scored.score
            elif signal.kind == P_TRUE:
                if p_true is None:
                    raise LvlmlpError("P(True) was not computed")
                column[:] = p_true["scores"]
                seconds[signal.name] = 0.0  # all model time: the pass is counted in the model seconds
            else:
                start = time.perf_counter()
                column[:] = baseline_scores(test.run, str(signal.baseline), test.idx, task=task_name)
                seconds[signal.name] = (time.perf_counter() - start) / max(test.idx.size, 1)
        except LvlmlpError as err:
            notes[signal.name] = str(err)
        scores[signal.name] = column
    records = [{"id": test.run.ids[int(i)], "label": int(y),
                "scores": {n: (None if np.isnan(c[k]) else float(c[k])) for n, c in scores.items()}}
               for k, (i, y) in enumerate(zip(test.idx, test.y))]
    scores_path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(scores_path, records)
    entries = summarize_scores(records, [s.name for s in signals], protocol.n_boot, protocol.seed)
    for signal, entry in zip(signals, entries):
        if signal.name in notes:
            entry["note"] = notes[signal.name]
        passes = forward_passes(signal, test.run, test.idx)
        cost: dict[str, Any] = {"forward_passes": passes, "extra_forward_passes": passes - 1.0,
                                "bytes_per_row": bytes_per_row(signal, test.run, test.idx),
                                "readout_seconds_per_row": seconds.get(signal.name)}
        if timing is not None and signal.name in seconds:
            # The model work the signal needs, timed by itself in this run (`model_timing`); P(True) adds its own
            # pass, timed on every labelled test row.
            work = model_work(signal, test.run)
            cost["model_work"] = work if isinstance(work, str) else f"generate {work} tokens"
            model = timed_seconds(timing, work)
            if signal.kind == P_TRUE and p_true is not None:
                cost["pass_seconds_per_row"] = float(p_true["seconds_per_row"])
                model = None if model is None else model + cost["pass_seconds_per_row"]
            cost["model_seconds_per_row"] = model
            cost["seconds_per_row"] = None if model is None else model + seconds[signal.name]
        entry.update(kind=signal.kind, cost=cost)
    return {"reference": signals[0].name, "signals": entries, "timing": timing, "scores": scores_path.name}


def summarize_scores(records: list[dict], names: list[str], n_boot: int, seed: int) -> list[dict[str, Any]]:
    """The table's statistics from the saved per-row scores alone: AUROC [95% bootstrap CI] of each signal on the
    rows it scores, and DeLong's test against `names[0]` on the rows both score."""
    from lvlmlp.probing.compare import delong_test
    from lvlmlp.probing.metrics import auroc, bootstrap_ci

    y = np.array([r["label"] for r in records], dtype=np.int64)

    def column(name: str) -> np.ndarray:
        return np.array([np.nan if r["scores"].get(name) is None else r["scores"][name] for r in records])

    ref = column(names[0])
    out = []
    for name in names:
        s = column(name)
        has = ~np.isnan(s)
        entry: dict[str, Any] = {"name": name, "n": int(has.sum()), "n_missing": int((~has).sum())}
        value = auroc(y[has], s[has]) if has.any() else None
        ci = bootstrap_ci(y[has], s[has], "auroc", n_boot=n_boot, seed=seed) if value is not None else None
        entry.update(metric="auroc", value=value, ci=None if ci is None else [float(ci[0]), float(ci[1])])
        both = has & ~np.isnan(ref)
        entry.update(delta=None, delong_z=None, delong_p=None, n_paired=int(both.sum()))
        if name != names[0] and value is not None:
            try:
                test = delong_test(y[both], s[both], ref[both])
                entry.update(delta=test["delta"], delong_z=test["delong_z"], delong_p=test["delong_p"])
            except LvlmlpError as err:
                entry["note"] = str(err)
        out.append(entry)
    return out


# ------------------------------------------------------------------------------------------------ report
HEADER = ["signal", "AUROC [95% CI]", "delta vs paper's probe", "DeLong p", "n", "forward passes", "extra passes",
          "s/row", "bytes/row", "note"]


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    from lvlmlp.study.report import fmt_ci

    rows = []
    for e in result["signals"]:
        c = e.get("cost") or {}
        sec = c.get("seconds_per_row")
        rows.append([e["name"], fmt_ci(e["value"], e["ci"]),
                     "reference" if e["name"] == result["reference"] else _signed(e.get("delta")),
                     "–" if e.get("delong_p") is None else f"{e['delong_p']:.3g}", str(e["n"]),
                     f"{c.get('forward_passes', 0):.2f}", f"{c.get('extra_forward_passes', 0):.2f}",
                     "–" if sec is None else f"{sec:.3g}", f"{c.get('bytes_per_row', 0):,.0f}", e.get("note", "")])
    return rows


def _signed(value: Any) -> str:
    return "–" if value is None else f"{value:+.3f}"


def plot_cost(result: dict[str, Any], path: Path, title: str) -> None:
    """AUROC (95% CI) against seconds per row (log scale; the readout alone where no model timing was taken)."""
    from lvlmlp.study.report import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=100)
    for e in result["signals"]:
        c = e.get("cost") or {}
        x = c.get("seconds_per_row") or c.get("readout_seconds_per_row")
        if e["value"] is None or not x:
            continue
        err = [[e["value"] - e["ci"][0]], [e["ci"][1] - e["value"]]] if e.get("ci") else None
        ref = e["name"] == result["reference"]
        ax.errorbar([x], [e["value"]], yerr=err, marker="s" if ref else "o", capsize=3,
                    color="tab:red" if ref else "tab:blue")
        ax.annotate(e["name"], (x, e["value"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set(xlabel="seconds per row (model + readout)", ylabel="AUROC", title=title)
    save_figure(fig, path)


def section_text(result: dict[str, Any]) -> str:
    timing = result.get("timing")
    timed = (f"Model seconds measured in this run on {timing['rows']} test rows (one batch), each signal's model "
             f"work timed by itself: {timing_words(timing)}. " if timing
             else "No model timing (the signals' model seconds are unknown). ")
    return ("Each signal on the same labelled test rows and protocol, against the paper's probe (logistic regression "
            "on the first generated token's raw logits): AUROC with a 95% bootstrap interval, the difference and "
            "DeLong's paired test on the rows both score. Costs per row: forward passes before the signal is known "
            "(1 = the prefill that gives the first token; extra = beyond it), seconds (model + reading and scoring "
            "the stored features) and bytes stored. " + timed +
            f"Per-row scores: analyses/{result['scores']}.")


def timing_words(timing: dict[str, Any]) -> str:
    """The measured model works in words: "prefill 0.01 s/row, generate 3 tokens 0.03 s/row, ..."."""
    names = {"prefill": "prefill", "prefill_states": "prefill with hidden states",
             "prefill_vision": "prefill with vision features"}
    parts = [f"{words} {timing[key]:.3g} s/row" for key, words in names.items() if timing.get(key) is not None]
    parts += [f"generate {k} tokens {v:.3g} s/row" for k, v in timing.get("generate", {}).items()]
    return ", ".join(parts)
