"""`python -m foldtune.search ...`: the same command as `foldtune search` (command.py)."""

import sys

from foldtune.search.command import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m foldtune.search"))
