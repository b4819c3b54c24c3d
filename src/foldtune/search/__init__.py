"""Hyper-parameter search over a config's keys with optuna: `foldtune search` (python -m foldtune.search).

space.py reads and checks the space file (which keys, which values); definition.py holds a
search's base config, space and folder, checked; study.py runs the trials, each a run folder
trained fold by fold with a pruner told of every fold; records.py writes what the search
found (trials.csv, best.yaml, report.md); command.py is its command line.
"""
