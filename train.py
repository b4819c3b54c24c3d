"""Train every fold of a config: `python train.py [--config FILE] [--folds 0,2] [section.key=value ...]`."""

import sys

from foldtune.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
