"""The extraction options, defined, defaulted and checked once: `lvlmlp extract`'s flags, a `lvlmlp run` config's
`extract:` section (and its `batch_size`), Ray and Python callers all build one `ExtractOptions`, which
`extract(...)` and `ray_extract(...)` take. Adding an option is one field here (with its check), its use, its test.

Errors name the field (`store_dtype: expected one of ...`); a caller that knows the option by another name (the CLI
by its flag, the config by its key) says it its way with `ExtractOptionsError.named`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lvlmlp.defaults import BATCH_SIZE, STORE_DTYPE_NAMES
from lvlmlp.errors import LvlmlpError


class ExtractOptionsError(LvlmlpError):
    """A bad extraction option. `template` names the fields as `{field}`; the message names them as they are."""

    def __init__(self, template: str, **values: Any) -> None:
        self.template, self.values = template, values
        super().__init__(self.named({}))

    def named(self, names: Mapping[str, str]) -> str:
        """The message with each field called by `names[field]` (e.g. the CLI's `--store-dtype`), else its name."""
        fields = {f.name: names.get(f.name, f.name) for f in dataclasses.fields(ExtractOptions)}
        return self.template.format(**fields, **self.values)


def flag_names() -> dict[str, str]:
    """`lvlmlp extract`'s flag of each field: `store_dtype` -> `--store-dtype`."""
    return {f.name: "--" + f.name.replace("_", "-") for f in dataclasses.fields(ExtractOptions)}


@dataclass(frozen=True)
class ExtractOptions:
    """How to extract (what is kept, how it is stored, how the work is cut); not the model nor the rows."""

    batch_size: int = BATCH_SIZE  # rows per forward
    max_new_tokens: int = 0  # 0: one prefill forward (first token only); K: greedy generation keeping K tokens
    logits_tokens: int | None = None  # keep the first T of the K tokens' logits (and each row's last); None: all K
    hidden: bool = False  # the final-norm hidden state at the first token
    layers: tuple[int, ...] | str = ()  # these layers' hidden states; "quartiles": resolved from the model
    vision: bool = False  # the vision encoder's output that the projector reads, mean-pooled
    store_dtype: str = "float16"  # of the stored logits and hidden states
    on_error: str = "fail"  # a row that cannot be read: fail stops the run, skip records it in failures.jsonl
    shard: tuple[int, int] | None = None  # (I, N): these rows are the I-th of N contiguous blocks (the manifest's)
    shard_size: int = 256  # rows per committed shard (the resume granularity)
    workers: int = 1  # data-loader processes preparing batches (0: in this process)

    def __post_init__(self) -> None:
        if self.store_dtype not in STORE_DTYPE_NAMES:
            raise ExtractOptionsError("{store_dtype}: expected one of " + str(sorted(STORE_DTYPE_NAMES))
                                      + ", got {value}", value=repr(self.store_dtype))
        if self.on_error not in ("fail", "skip"):
            raise ExtractOptionsError("{on_error}: expected fail or skip, got {value}", value=repr(self.on_error))
        if self.batch_size < 1 or self.max_new_tokens < 0:
            raise ExtractOptionsError("{batch_size} must be >= 1 and {max_new_tokens} >= 0")
        if self.logits_tokens is not None and self.logits_tokens < 1:
            raise ExtractOptionsError("{logits_tokens}: expected an integer >= 1, got {value}",
                                      value=self.logits_tokens)
        if self.shard_size < 1 or self.workers < 0:
            raise ExtractOptionsError("{shard_size} must be >= 1 and {workers} >= 0")
        if self.shard is not None:
            i, n = self.shard
            if not (n >= 1 and 0 <= i < n):
                raise ExtractOptionsError("{shard}: need 0 <= I < N, got {value}", value=f"'{i}/{n}'")
            object.__setattr__(self, "shard", (int(i), int(n)))
        if not isinstance(self.layers, str):  # numpy integers and lists -> a tuple of ints (hashable, JSON-able)
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))

    @classmethod
    def of(cls, options: ExtractOptions | None = None, **changes: Any) -> ExtractOptions:
        """`options` (default: the defaults) with `changes`: what `extract(..., batch_size=2)` callers pass."""
        return dataclasses.replace(options or cls(), **changes)

    @property
    def n_keep(self) -> int:
        """The generated tokens whose logits are stored; 1 for prefill."""
        return max(1, min(self.max_new_tokens, self.logits_tokens or self.max_new_tokens))

    def check_labels(self, labels_from_responses: bool, source: str) -> None:
        """Labels computed from the model's answers (MathVista) need answers."""
        if labels_from_responses and not self.max_new_tokens:
            raise ExtractOptionsError("{source}: labels come from the model's answers here; give {max_new_tokens} "
                                      "K (> 0)", source=source)

