"""What a search trains: its base config (a file and overrides), its space and its folder,
checked before any trial."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from foldtune.config import Config, ConfigError, ConfigOrigin, load_config
from foldtune.data.validate import with_folds_of_column
from foldtune.search.space import SearchSpace, load_space, with_values

TRIAL_RUN = "trial_{:04d}"           # a trial's run folder in the search folder


@dataclass(frozen=True)
class Search:
    """What a search trains: its base config (file and overrides), its space, its folder."""

    config: Path
    overrides: tuple[str, ...]
    base: Config
    space: SearchSpace
    out: Path

    def trial_config(self, number: int, values: dict[str, Any]) -> Config:
        """The base config with a trial's values, its run folder out/trial_NNNN."""
        return with_values(self.base, {**values, "output.dir": str(self.out), "output.name": TRIAL_RUN.format(number)})


def prepare_search(config: str | Path, overrides: Sequence[str], space: str | Path,
                   out: str | Path | None) -> Search:
    """The base config and the space, checked before any trial: the space on the base
    config and the device the trials train on (training/checks.py)."""
    from foldtune.runtime.precision import resolve_device
    from foldtune.training.checks import check_config_against_device

    origin = ConfigOrigin(config, tuple(overrides))
    base = with_folds_of_column(load_config(config, overrides), origin)
    if base.training.parallel_folds > 1:
        raise ConfigError(f"training.parallel_folds={base.training.parallel_folds}: a search trains a trial's folds "
                          "one after another, to prune it after each: set training.parallel_folds: 1")
    if base.distill.teacher is not None:
        raise ConfigError("distill.teacher: a distillation run trains one student, with no folds to prune on: "
                          "search its config without distill.teacher")
    device = resolve_device(base.training.device)
    checked = load_space(space, base, lambda cfg: check_config_against_device(cfg, device))
    out = Path(out) if out is not None else Path(base.output.dir) / f"search-{Path(config).stem}"
    return Search(Path(config), tuple(overrides), base, checked, out)
