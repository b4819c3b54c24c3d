"""Write a submission from a run's fold checkpoints: `python infer.py [--run runs/X] [--test FILE] [--out FILE]`."""

import sys

from foldtune.cli import infer_main

if __name__ == "__main__":
    sys.exit(infer_main())
