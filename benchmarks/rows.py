"""What the job benchmarks share: --tiny's defaults, rows kept as they come, a command run
and timed with its log kept, and the shares of heads kept that the pruning benchmarks take.

A benchmark's rows are printed as JSON lines and, with --out, the whole list is written
again after each row: a command stopped by its time limit keeps the rows it finished.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

# train.py's last line: the run folder and its time after imports
DONE = re.compile(r"done: (\S+) in ([0-9.]+) s")


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


def parse_shares(text: str, option: str) -> list[float]:
    """Distinct shares of attention heads kept, in (0, 1], from "1.0,0.5"; exits naming
    `option` otherwise."""
    expected = f"{option} {text}: expected distinct shares of heads kept in (0, 1], e.g. 1.0,0.75,0.5,0.25"
    try:
        shares = [float(part) for part in text.split(",")]
    except ValueError:
        raise SystemExit(expected) from None
    if any(not 0 < share <= 1 for share in shares) or len(set(shares)) != len(shares):
        raise SystemExit(expected)
    return shares


def run_timed(name: str, command: list, logs: Path, env: dict[str, str] | None = None
              ) -> tuple[subprocess.CompletedProcess, float]:
    """The finished command (offline, unbuffered, with `env` on top; its output also in
    logs/<name>.log) and its wall seconds; exits naming the log if it failed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    started = time.perf_counter()
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    (logs / f"{name}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"{name} failed (exit {result.returncode}; {logs / name}.log): {last}")
    return result, wall
