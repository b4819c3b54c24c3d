"""Training one fold (FoldTrainer) and every fold of a run."""
