"""The experiment config of `lvlmlp run`: a typed tree of dataclasses whose defaults are the only defaults.

The YAML file, `--set key=value` overrides and the command's flags are three ways to fill the same tree: they are
merged into one nested dict (file, then `--set`, then flags), which `build` turns into an `ExperimentConfig`,
checking every key's type and range and naming the key at fault (`config: batch_size: expected an integer, got
'eight'`). `validate` then checks what needs the registries (task, prompt styles, probe kind, baselines), all before
any model is loaded.

Adding a section is one small dataclass and one line in `ExperimentConfig`:

    @dataclass
    class FinetuneConfig(Section):
        epochs: int = field(default=1, metadata={"min": 1})

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)   # in ExperimentConfig

A `Section` reads like a read-only mapping too (`cfg["extract"]["layers"]`), for code that reads sections by key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from lvlmlp.defaults import BATCH_SIZE, N_BOOT
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.options import ExtractOptions
from lvlmlp.ranges import NONNEG_FLOAT, POSITIVE, PROBABILITY, Range
from lvlmlp.study.finetune import DEFAULT_TARGETS, Settings


@dataclass
class Section(Mapping):
    """Base of every config section: type-checked construction from a dict, a mapping view, `to_dict`.

    A subclass with `OPEN = "params"` keeps keys it does not declare in that dict field (hyper-parameters checked
    by their consumer, e.g. the probe's), instead of refusing them as typos."""

    OPEN: ClassVar[str | None] = None

    def __getitem__(self, key: str) -> Any:
        names = [f.name for f in dataclasses.fields(self) if f.name != self.OPEN]
        if key in names:
            return getattr(self, key)
        if self.OPEN is not None and key in getattr(self, self.OPEN):
            return getattr(self, self.OPEN)[key]
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        for f in dataclasses.fields(self):
            if f.name == self.OPEN:
                yield from getattr(self, f.name)
            else:
                yield f.name

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (open keys flattened in, as they were written)."""
        return {k: (v.to_dict() if isinstance(v, Section) else v) for k, v in self.items()}


def _min(value: int) -> dict[str, Any]:
    return {"range": Range(int, value)}


def _in(rng: Range) -> dict[str, Any]:
    return {"range": rng}


@dataclass
class ExtractConfig(Section):
    """The `ExtractOptions` a config may set (`batch_size` is top-level), by their names, with their defaults."""

    max_new_tokens: int = field(default=ExtractOptions.max_new_tokens, metadata=_min(0))  # 0: prefill only
    # store the first T tokens' logits (and each row's last generated token) when T < max_new_tokens
    logits_tokens: int | None = field(default=ExtractOptions.logits_tokens, metadata=_min(1))
    hidden: bool = ExtractOptions.hidden
    layers: list[int] | Literal["quartiles"] = field(default_factory=list)  # quartiles: {0, L/4, L/2, 3L/4, L}
    vision: bool = ExtractOptions.vision  # the vision encoder's output the projector reads, mean-pooled
    store_dtype: Literal["float16", "float32"] = ExtractOptions.store_dtype
    on_error: Literal["fail", "skip"] = ExtractOptions.on_error


@dataclass
class SplitsConfig(Section):
    """Train on `train`, test on `test`; or, with `cv: K`, K-fold cross-validation on the one split `split`
    (default: the task's default split), `train`/`test` then unused."""

    train: str = "train"
    test: str = "test"
    cv: int | None = field(default=None, metadata=_min(2))
    split: str | None = None
    shuffle: bool = False  # shuffled folds (the original's cross_validate(cv=10) does not shuffle)


@dataclass
class ProbeConfig(Section):
    OPEN: ClassVar[str | None] = "params"
    kind: str = "logistic"  # a name of lvlmlp.probing.probes.PROBES
    feature: Literal["logits", "log_softmax", "softmax"] = "logits"
    params: dict[str, Any] = field(default_factory=dict)  # the probe's hyper-parameters, e.g. C: 0.5


@dataclass
class ClipConfig(Section):
    model: str | None = None  # required when the section is given
    kinds: list[Literal["image", "text", "concat"]] = field(default_factory=lambda: ["image", "text", "concat"])
    batch_size: int = field(default=16, metadata=_min(1))


@dataclass
class AnalysesConfig(Section):
    token_decay: bool = True
    layer_sweep: bool = True
    # bootstrap resamples of the token-decay and layer-sweep intervals (None: the experiment's n_boot)
    n_boot: int | None = field(default=None, metadata=_min(0))


@dataclass
class SteeringConfig(Section):
    """Probe-guided decoding on the test split (`lvlmlp.steering.guard`): rows whose first-token probe score
    P(label 1) is below `threshold` (default: the probe's own, probe.json) are made to start with `template`; the
    greedy answers of the extraction (`extract.max_new_tokens` tokens) are the unguarded ones."""

    template: str | None = None  # required when the section is given
    threshold: float | None = field(default=None, metadata=_in(PROBABILITY))  # None: the probe's (probe.json)


@dataclass
class SignalsConfig(Section):
    """*Which signal?* (docs/signals.md): (feature, probe) pairs and baselines, each against the paper's first-token
    logistic probe on the same test rows, with their costs (model seconds timed on `timing_rows` test rows)."""

    probes: list[dict[str, Any]] = field(default_factory=list)  # {feature, probe, token, layer, tokens, params...}
    baselines: list[str] = field(default_factory=list)
    timing_rows: int = field(default=8, metadata=_min(1))


@dataclass
class RayConfig(Section):
    """`ray:` as a mapping (`lvlmlp.extraction.ray_extract.RayOptions`); `ray: true` / `local` / `auto` / an address also work."""

    address: str | None = None  # None: a local Ray instance for this run; "auto" or an address: join that cluster
    replicas: int | None = field(default=None, metadata=_min(1))  # default: one per GPU, else one per CPU slot
    cpus_per_replica: float = field(default=1.0, metadata=_in(POSITIVE))
    gpus_per_replica: float | None = field(default=None, metadata=_in(NONNEG_FLOAT))
    connect_timeout: float = field(default=30.0, metadata=_in(POSITIVE))  # seconds for the cluster at `address` to answer


@dataclass
class JudgeConfig(Section):
    """`lvlmlp judge` on each prompt's test-split run after extraction (docs/judge.md): the original's GPT-4
    judgments of VizWiz / MAD-Bench / MM-SafetyBench responses, MathVista's answer extraction (its labels)."""

    endpoint: str | None = None  # required when the section is given: the OpenAI client's base URL
    model: str | None = None  # None: the original's (gpt-4-1106-preview; MathVista gpt-4-0125-preview)
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = field(default=4, metadata=_min(1))
    scenario_templates: Literal["paper", "by-name"] = "paper"  # MM-SafetyBench, see lvlmlp.judging.templates
    mathvista_rounding: Literal["paper", "fixed"] = "paper"  # see lvlmlp.judging.mathvista


@dataclass
class FinetuneConfig(Section):
    """`finetune:` LoRA-finetuning vs probing (docs/finetune.md). The LoRA fields are those of
    `lvlmlp.study.finetune.Settings`, with its defaults (`seed`: the config's); the other three say the comparison."""

    epochs: int = field(default=Settings.epochs, metadata=_min(1))
    lr: float = Settings.lr
    lora_rank: int = field(default=Settings.lora_rank, metadata=_min(1))
    lora_alpha: float = Settings.lora_alpha
    lora_dropout: float = Settings.lora_dropout
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))  # or "q_proj,v_proj"
    batch_size: int = field(default=Settings.batch_size, metadata=_min(1))
    grad_accum: int = field(default=Settings.grad_accum, metadata=_min(1))
    seed: int | None = None  # None: the config's seed
    max_grad_norm: float = Settings.max_grad_norm
    answers: str | None = None  # LABEL1,LABEL0 such as Yes,No; None: the prompt style's answer words
    max_new_tokens: int = field(default=3, metadata=_min(0))  # tokens of the finetuned model's own answer
    every_epoch: bool = True  # evaluate after each epoch (the plot), not only the final model

    def settings(self, seed: int) -> Settings:
        """The finetuning's `Settings`, checked (`seed`: the config's, unless the section gives one)."""
        targets = self.target_modules
        targets = targets.split(",") if isinstance(targets, str) else map(str, targets)
        lora = {f.name: getattr(self, f.name) for f in dataclasses.fields(Settings)}
        settings = Settings(**{**lora, "seed": seed if self.seed is None else self.seed,
                               "target_modules": tuple(t.strip() for t in targets if t.strip())})
        settings.check()
        return settings

    def comparison(self) -> dict[str, Any]:
        """The comparison's options (answers, max_new_tokens, every_epoch)."""
        return {"answers": self.answers, "max_new_tokens": self.max_new_tokens, "every_epoch": self.every_epoch}


@dataclass
class ExperimentConfig(Section):
    name: str | None = None  # report title; default: the config file's name
    model: str | None = None  # hub id or local folder of the VLM (required)
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    raw_prompt: bool = False
    system_prompt: str | None = None  # a system turn before the user's (the llava_v1 line of the LLaVA-1.5 configs)
    trust_remote_code: bool = False  # run the checkpoint's own code (its config.json's auto_map; docs/models.md)
    # "module:Class" or "path/file.py:Class": a model outside the Auto classes (the backend protocol, docs/backends.md)
    backend: str | None = None
    task: str = "jsonl"
    data_root: str | None = None  # required
    image_root: str | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    # None (the task's default), a style of tasks/prompts.yaml, a "{question}" template, or a list of these
    prompt: str | list[str | None] | None = None
    splits: SplitsConfig = field(default_factory=SplitsConfig)
    limit: int | None = field(default=None, metadata=_min(1))  # seeded random N rows per split
    per_class: int | None = field(default=None, metadata=_min(1))
    seed: int = field(default=0, metadata=_min(0))
    batch_size: int = field(default=BATCH_SIZE, metadata=_min(1))  # rows per forward; may change the last float digits
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    baselines: list[str] = field(default_factory=list)
    clip: ClipConfig | None = None
    analyses: AnalysesConfig = field(default_factory=AnalysesConfig)
    n_boot: int = field(default=N_BOOT, metadata=_min(0))  # bootstrap resamples for the intervals (0: none)
    out: str | None = None  # required
    # extract on Ray (README, "Scaling out"): true (a local instance), auto or an address (join), or a mapping
    ray: RayConfig | bool | str | None = None
    steering: SteeringConfig | None = None  # probe-guided decoding (docs/experiments.md)
    finetune: FinetuneConfig | None = None  # finetuning vs probing (docs/finetune.md)
    judge: JudgeConfig | None = None  # an LLM judge of the test runs' responses (docs/judge.md)
    signals: SignalsConfig | None = None  # Which signal? (docs/signals.md)
    # Several tasks of this model (docs/signals.md): each entry the keys that differ (task, data_root, name, ...);
    # each runs as a config of its own in OUT/tasks/NAME, and the report holds the transfer table.
    tasks: list[dict[str, Any]] = field(default_factory=list)
    transfer: bool | None = None  # the transfer table of `tasks`; None: when 2+ tasks have splits {train, test}

    def resolved_task(self) -> Any:
        """The task named by `task` (`lvlmlp.tasks.get_task`), looked up once: every step of a run asks here."""
        cached = self.__dict__.get("_task")
        if cached is None or cached[0] != self.task:  # (name, task): a config whose task was changed looks again
            from lvlmlp.tasks import get_task

            cached = self.__dict__["_task"] = (self.task, get_task(self.task))
        return cached[1]


REQUIRED = ("model", "data_root", "out")
# Keys a `tasks:` entry cannot change: the tasks share one model (and its loading) and the run's folder.
SHARED_KEYS = ("model", "device", "dtype", "raw_prompt", "system_prompt", "out", "ray", "tasks", "transfer")


def task_configs(cfg: ExperimentConfig) -> list[ExperimentConfig]:
    """The configs of `cfg.tasks`: `cfg` with each entry's keys changed, named by the entry's `name` (default: its
    task), run in `OUT/tasks/NAME`; each built and validated, an error naming its entry."""
    base = {k: v for k, v in cfg.to_dict().items() if k not in ("tasks", "transfer", "name")}
    out: list[ExperimentConfig] = []
    for i, entry in enumerate(cfg.tasks):
        where = f"config: tasks[{i}]"  # a mapping: the config's type check said so already
        shared = [k for k in SHARED_KEYS if k in entry]
        if shared:
            raise LvlmlpError(f"{where}: {shared[0]} is shared by every task (one model, one run folder); set it "
                              "outside tasks:")
        name = str(entry.get("name") or entry.get("task") or cfg.task)
        if name in [c.name for c in out]:
            raise LvlmlpError(f"{where}: a second task named {name!r}; give each entry its own name:")
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise LvlmlpError(f"{where}: name {name!r} names a folder: use letters, digits, '-', '_' and '.'")
        try:
            child = build(ExperimentConfig, merge(base, entry, {"name": name, "out": str(Path(cfg.out) / "tasks" / name)}))
            assert isinstance(child, ExperimentConfig)
            validate(child)
        except LvlmlpError as err:
            raise LvlmlpError(f"{where}: {str(err).removeprefix('config: ')}") from None
        out.append(child)
    return out


# ------------------------------------------------------------------------------------------------ filling
def parse_set(items: list[str]) -> dict[str, Any]:
    """`["a.b=1", "c=[x, y]"]` -> {"a": {"b": 1}, "c": ["x", "y"]}; values are read as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise LvlmlpError(f"--set {item!r}: expected KEY=VALUE, e.g. extract.max_new_tokens=5")
        value = _yaml(text, f"--set {item!r}") if text.strip() else None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise LvlmlpError(f"--set {item!r}: {part!r} is set to a value and a section at once")
        node[parts[-1]] = value
    return out


def _yaml(text: str, where: str) -> Any:
    """Plain YAML only: a tag such as !!python/object is refused with a message, never constructed."""
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as err:
        mark = err.problem_mark
        at = f" at line {mark.line + 1}" if mark else ""
        raise LvlmlpError(f"{where}: YAML tags are not allowed{at} ({err.problem}); write plain values") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise LvlmlpError(f"{where}: not valid YAML{at}") from None


def load_config(path: str | Path, sets: list[str] = (), **flags: Any) -> ExperimentConfig:
    """The file, then `--set` overrides, then the named flags (those not None): merged, built into the typed
    `ExperimentConfig` (its defaults fill the rest) and validated, all before any work."""
    path = Path(path)
    if not path.is_file():
        raise LvlmlpError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LvlmlpError(f"{path}: not UTF-8 text") from None
    raw = _yaml(text, str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise LvlmlpError(f"{path}: the config must be a mapping of keys to values")
    merged = merge(raw, parse_set(list(sets)), {k: v for k, v in flags.items() if v is not None})
    cfg = build(ExperimentConfig, merged)
    assert isinstance(cfg, ExperimentConfig)
    cfg.name = cfg.name or path.stem
    validate(cfg)
    return cfg


def build(cls: type[Section], data: Any, prefix: str = "") -> Section:
    """`data` (a dict from YAML/--set/flags) -> an instance of `cls`; every key type-checked, unknown keys refused."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(data, Mapping):
        raise LvlmlpError(f"config: {where} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != cls.OPEN}
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            if cls.OPEN is not None:
                extra[str(key)] = value
                continue
            section = f"{prefix}{key!r}" if prefix else repr(key)
            raise LvlmlpError(f"config: unknown key {section} (keys: {', '.join(fields)})")
        f = fields[key]
        values[key] = _check(value, hints[key], f"{prefix}{key}", f.metadata)
    if cls.OPEN is not None:
        values[cls.OPEN] = extra
    return cls(**values)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is bool:
        return "true or false"
    if hint is str:
        return "a string"
    if hint is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if isinstance(hint, type) and issubclass(hint, Section):
        return "a mapping"
    return str(hint)


def _check(value: Any, hint: Any, key: str, meta: Mapping[str, Any] = types.MappingProxyType({})) -> Any:
    """`value` if it is of type `hint` (a section is built; an int is accepted for a float), else an error."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    fail = LvlmlpError(f"config: {key}: expected {_describe(hint)}, got {value!r}")
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, key, meta)
            except LvlmlpError as err:
                # the member of the container's own shape (a list for a list) has the precise message
                same = isinstance(value, list) == (typing.get_origin(arg) is list)
                # a Literal's "one of ..." is the precise message for a string only (`layers: 5` is no typo of it)
                same = same and not (typing.get_origin(arg) is Literal and not isinstance(value, str))
                inner = err if same and (inner is None or typing.get_origin(arg) is list) else inner
        raise inner or fail
    if isinstance(hint, type) and issubclass(hint, Section):
        return build(hint, value, f"{key}.")
    if origin is Literal:
        if value not in args or isinstance(value, bool):
            raise fail
        return value
    if origin is list:
        if not isinstance(value, list):
            raise fail
        return [_check(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise fail
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise fail
        return value
    if hint in (int, float):
        ok = isinstance(value, int) or (hint is float and isinstance(value, float))
        if isinstance(value, bool) or not ok:
            raise fail
        rng = meta.get("range") or (Range(hint, meta["min"]) if "min" in meta else None)
        if rng is not None:  # its declared range, finite (a YAML .nan or .inf is refused here)
            rng.check(value, f"config: {key}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise fail
        return value
    raise TypeError(f"config: no checker for {hint!r} ({key})")  # a programming error in a section's hints


def merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Later layers over earlier ones, sections merged key by key (the one merge path of file, --set, flags)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
    return out


def validate(cfg: ExperimentConfig) -> None:
    """Checks that need the registries (tasks, prompt styles, probes, baselines): before any model work."""
    from lvlmlp.probing.baselines import PAPER_ANSWER, check_baseline_name, check_paper_rule

    if cfg.tasks:  # each task's config is checked as a config of its own (data_root may be per task)
        for key in ("model", "out"):
            if not cfg[key]:
                raise LvlmlpError(f"config: {key!r} is required (in the file, or --{key} / --set)")
        children = task_configs(cfg)
        if cfg.transfer and len(children) < 2:
            raise LvlmlpError("config: transfer needs two or more tasks: entries")
        if cfg.transfer and any(c.splits.cv is not None for c in children):
            raise LvlmlpError("config: transfer needs splits {train, test} (a fitted probe per task), not cv")
        return
    if cfg.transfer:
        raise LvlmlpError("config: transfer is the table of several tasks: list them under tasks:")
    for key in REQUIRED:
        if not cfg[key]:
            raise LvlmlpError(f"config: {key!r} is required (in the file, or --{key.replace('_', '-')} / --set)")
    try:
        cfg.resolved_task()
    except LvlmlpError as err:
        raise LvlmlpError(f"config: task: {err}") from None
    if cfg.backend is not None:
        _check_backend(cfg)
    if cfg.extract.vision and cfg.ray:
        raise LvlmlpError("config: extract.vision does not run on ray yet; remove one of them")
    if cfg.clip is not None and not cfg.clip.model:
        raise LvlmlpError("config: clip.model is required when the clip section is given")
    if cfg.steering is not None:
        if not cfg.steering.template:
            raise LvlmlpError("config: steering.template is required when the steering section is given")
        if cfg.extract.max_new_tokens < 1 or cfg.splits.cv is not None:
            raise LvlmlpError("config: steering needs extract.max_new_tokens >= 1 (the unguarded answers) and "
                              "splits {train, test}")
    if cfg.judge is not None:
        from lvlmlp.judging.templates import task_template

        if not cfg.judge.endpoint:
            raise LvlmlpError("config: judge.endpoint is required when the judge section is given")
        try:
            task_template(cfg.task)
        except LvlmlpError as err:
            raise LvlmlpError(f"config: judge: {str(err).removeprefix('--task ')}") from None
        if cfg.extract.max_new_tokens < 1:
            raise LvlmlpError("config: judge needs responses: set extract.max_new_tokens >= 1")
    for i, name in enumerate(cfg.baselines):
        try:
            check_baseline_name(name)
        except LvlmlpError as err:
            raise LvlmlpError(f"config: baselines[{i}]: {err}") from None
    if PAPER_ANSWER in cfg.baselines:  # every prompt needs a rule of the original's notebooks
        for name, _ in prompts_of(cfg):
            try:
                check_paper_rule(cfg.task, prompt_style(cfg, name))
            except LvlmlpError as err:
                raise LvlmlpError(f"config: baselines: prompt {name}: {err}") from None
    if cfg.signals is not None:
        from lvlmlp.study.signals import parse_signals

        parse_signals(cfg.signals.probes, cfg.signals.baselines)
        if "p-true" in cfg.signals.baselines and cfg.extract.max_new_tokens < 1:
            raise LvlmlpError("config: signals: p-true asks the model about its own answer: set "
                              "extract.max_new_tokens >= 1")
    if cfg.finetune is not None:
        if cfg.splits.cv is not None or cfg.resolved_task().label_fn:
            raise LvlmlpError("config: finetune needs splits {train, test} and labels that do not come from answers")
        cfg.finetune.settings(cfg.seed)
    from lvlmlp.study.analyses import make_probe_factory

    try:  # the probe factory checks kind, parameters and their ranges (--set probe.C=-1 as `probe train --C -1`)
        make_probe_factory(dict(cfg.probe))
    except LvlmlpError as err:
        raise LvlmlpError(f"config: {err}") from None


def _check_backend(cfg: ExperimentConfig) -> None:
    """`backend:` refuses the keys that do not apply with it, as `--backend` refuses the flags (its prompt is its
    own, so is its loading; it gives no vision features and has no weights to finetune)."""
    given = [key for key, value in (("ray", cfg.ray), ("raw_prompt", cfg.raw_prompt),
                                    ("system_prompt", cfg.system_prompt), ("trust_remote_code", cfg.trust_remote_code),
                                    ("extract.vision", cfg.extract.vision), ("finetune", cfg.finetune)) if value]
    given += [f"prompt ({name})" for name, template in prompts_of(cfg) if template is not None]
    if given:
        raise LvlmlpError(f"config: backend: the backend renders its own prompts and loads its own model, so "
                          f"it takes no {', '.join(given)}")


# ------------------------------------------------------------------------------------- what a config names
def prompts_of(cfg: ExperimentConfig) -> list[tuple[str, str | None]]:
    """(name, template) of every prompt: a style name of the task, a template with {question}, or None."""
    from lvlmlp.tasks import prompt_template

    spec = cfg.prompt
    items = spec if isinstance(spec, list) else [spec]
    out: list[tuple[str, str | None]] = []
    for i, item in enumerate(items):
        if item is None:  # the task's default style (mathvista: oeh, as the original's scripts ran it)
            default = prompt_template(cfg.task)
            out.append(("default", None if default == "{question}" else default))
        elif not isinstance(item, str):
            raise LvlmlpError(f"config: prompt entries must be strings, got {item!r}")
        elif "{question}" in item:
            out.append((f"template{i + 1}" if len(items) > 1 else "template", item))
        else:
            out.append((item, prompt_template(cfg.task, item)))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise LvlmlpError(f"config: prompt lists the same style twice ({', '.join(names)})")
    return out


def prompt_style(cfg: ExperimentConfig, name: str) -> str | None:
    """The task's prompt style of a prompt named by `prompts_of` ("default": the task's default style); None for
    a template of one's own."""
    from lvlmlp.tasks import prompt_styles

    if name == "default":
        return cfg.resolved_task().default_prompt_style
    return name if name in prompt_styles(cfg.task) else None


def split_names(cfg: ExperimentConfig) -> list[str]:
    s = cfg.splits
    if s.cv is not None:

        return [str(s.get("split") or cfg.resolved_task().default_split)]
    return [s.train, s.test] if s.train != s.test else [s.train]
