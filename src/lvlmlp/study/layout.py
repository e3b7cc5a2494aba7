"""The folder layout of a `lvlmlp run` output, named once: the experiment writes it, the demo reads it (and its
own finetuning comparisons, `RunLayout(out).finetune`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    out: Path

    def __init__(self, out: str | Path) -> None:
        object.__setattr__(self, "out", Path(out))

    def run(self, prompt: str, split: str) -> Path:
        """The extraction run folder of a prompt and split."""
        return self.out / "runs" / f"{prompt}-{split}"

    def clip_run(self, kind: str, split: str) -> Path:
        """The CLIP/SigLIP feature run of an embedding kind and split (`clip:`)."""
        return self.out / "runs" / f"clip-{kind}-{split}"

    def eval(self, prompt: str) -> Path:
        """A prompt's (or `clip-KIND`'s) `probe eval` folder."""
        return self.out / "evals" / prompt

    def probe(self, prompt: str) -> Path:
        """A prompt's (or `clip-KIND`'s) trained probe."""
        return self.out / "probes" / prompt

    @property
    def analyses(self) -> Path:
        """Token decay, layer sweep, steering and signals results (`{analysis}-{prompt}.json`)."""
        return self.out / "analyses"

    def analysis(self, name: str, prompt: str, suffix: str = ".json") -> Path:
        """`analyses/{name}-{prompt}{suffix}`, e.g. token_decay-mq.json, steering-mq.jsonl."""
        return self.analyses / f"{name}-{prompt}{suffix}"

    @property
    def report(self) -> Path:
        """metrics.json, report.md, report.html and the plots."""
        return self.out / "report"

    @property
    def steps(self) -> Path:
        """The step stamps (`Steps`)."""
        return self.out / "steps"

    @property
    def finetune(self) -> Path:
        """The `finetune:` comparison (`lvlmlp.study.finetune.compare`'s folder)."""
        return self.out / "finetune"
