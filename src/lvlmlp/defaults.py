"""Defaults and choice lists shared by the library and the command line.

A light module (standard library only): the command modules read it while the parser is built, before any of
numpy, torch or scikit-learn is imported."""

BATCH_SIZE = 8  # rows per forward in `extract`
STORE_DTYPE_NAMES = ("float16", "float32")  # dtypes a run may store its features in
N_BOOT = 1000  # bootstrap resamples of every 95% interval
FEATURE_KINDS = ("logits", "log_softmax", "softmax", "hidden", "layer", "multi-token", "vision")
