"""Copy a demo's summary.md into README.md between the `demo summary` markers (tests/test_readme.py checks them).

    lvlmlp demo --out demo_out && python scripts/readme_demo_table.py demo_out/summary.md
"""

from __future__ import annotations

import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- demo summary: begin -->\n", "<!-- demo summary: end -->"


def main(summary: str) -> None:
    text = README.read_text()
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    README.write_text(head + BEGIN + Path(summary).read_text().rstrip("\n") + "\n" + END + tail)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo_out/summary.md")
