"""lvlmlp: first-token probing of vision-language models (Zhao et al., ECCV 2024)."""

__version__ = "0.1.0"

from lvlmlp.errors import LvlmlpError  # noqa: E402


def __getattr__(name: str):
    # The store imports numpy, probes and the guard torch / scikit-learn: load them on first use, so that
    # `import lvlmlp` (and the command line's parser) stays light.
    if name in ("Run", "open_run"):
        from lvlmlp.extraction import store

        return getattr(store, name)
    if name in ("LogisticProbe", "MultinomialProbe", "LDAProbe", "load_probe"):
        from lvlmlp.probing import probes

        return getattr(probes, name)
    if name in ("ProbeGuard", "guarded_generate"):
        from lvlmlp.steering import guard as steering

        return getattr(steering, name)
    raise AttributeError(f"module 'lvlmlp' has no attribute {name!r}")


__all__ = ["LDAProbe", "LogisticProbe", "LvlmlpError", "MultinomialProbe", "ProbeGuard", "Run", "guarded_generate",
           "load_probe", "open_run", "__version__"]
