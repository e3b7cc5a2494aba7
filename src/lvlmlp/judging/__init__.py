"""Judging stage: an LLM judge's verdicts on a run's responses, stored beside the run (`judgments.jsonl`).

The original code (LVLM-LP `utils/annotate.py`) asked GPT-4 whether each response answers, is safe or is deceived;
its notebooks then read those replies. `lvlmlp judge` writes them; `read_judgments` is what readers use.
"""

from lvlmlp.judging.store import JUDGMENTS_FILE, Judgment, read_judgments

__all__ = ["JUDGMENTS_FILE", "Judgment", "read_judgments"]
