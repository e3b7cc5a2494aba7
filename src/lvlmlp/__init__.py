"""lvlmlp: first-token probing of vision-language models (Zhao et al., ECCV 2024)."""

__version__ = "0.1.0"

from lvlmlp.errors import LvlmlpError  # noqa: E402
from lvlmlp.store import Run, open_run  # noqa: E402

__all__ = ["LvlmlpError", "Run", "open_run", "__version__"]
