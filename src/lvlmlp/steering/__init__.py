"""Steering: probe-guided decoding (`ProbeGuard`, a transformers LogitsProcessor)."""

from lvlmlp.steering.guard import ProbeGuard, guarded_generate  # noqa: F401
