"""What the job benchmarks share: --tiny's defaults, and rows kept as they come.

A benchmark's rows are printed as JSON lines and, with --out, the whole list is written
again after each row: a command stopped by its time limit keeps the rows it finished.
"""

from __future__ import annotations

import json
from pathlib import Path


def tiny_defaults(args, defaults: dict) -> None:
    """With --tiny, the options left unset take the tiny job's values."""
    for key, value in defaults.items() if args.tiny else ():
        if getattr(args, key) is None:
            setattr(args, key, value)


class Rows(list):
    """The benchmark's rows: each printed and, when `out` is set, written with the others."""

    def __init__(self, out: Path | None):
        super().__init__()
        self.out = out

    def keep(self, row: dict) -> None:
        self.append(row)
        print(json.dumps(row), flush=True)
        if self.out:
            self.out.write_text(json.dumps(self, indent=1))
