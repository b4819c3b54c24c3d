"""`python -m foldtune COMMAND ...`: the commands of foldtune (commands.py)."""

import sys

from foldtune.commands import main

if __name__ == "__main__":
    sys.exit(main())
