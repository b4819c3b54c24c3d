"""The search space: a YAML file naming config keys (dotted) and the values a trial may give them.

    training.lr: {low: 1.0e-5, high: 1.0e-4, log: true}   a number from a range (log: on a log scale)
    training.epochs: {low: 2, high: 5, step: 1}           an integer key's range holds integers
    model.pooling: {choices: [mean, cls, attention]}      one of a list (any key but a list-valued one)

Every entry is checked against the Config dataclasses before a trial starts: the key
exists, its range or choices have the key's type, and each bound and each choice is a
value the config (and `check`, the run's own checks) accepts. A mistake fails in one
line naming the file, the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import yaml

from foldtune.config import Config, ConfigError, config_from_dict, config_to_dict, flatten, set_dotted, yaml_problem

RANGE_FIELDS = ("low", "high", "log", "step")
# The trials share the base config's folds (their scores compare) and the search names their folders.
FIXED_SECTIONS = {"folds": "folds (the trials' scores compare only on the same folds)",
                  "output": "output (the search names each trial's run folder)"}


class SpaceError(ConfigError):
    """A space file that cannot be searched; the message names the file and the key."""


@dataclass(frozen=True)
class Range:
    """Numbers from low to high (integers for an integer key), on a log scale or in steps."""

    key: str
    low: float
    high: float
    integer: bool
    log: bool = False
    step: float | None = None

    def suggest(self, trial) -> Any:
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def as_dict(self) -> dict[str, Any]:
        described = {"low": self.low, "high": self.high, "log": self.log}
        return described if self.step is None else {**described, "step": self.step}


@dataclass(frozen=True)
class Choices:
    """One value of a list."""

    key: str
    choices: tuple

    def suggest(self, trial) -> Any:
        return trial.suggest_categorical(self.key, list(self.choices))

    def as_dict(self) -> dict[str, Any]:
        return {"choices": list(self.choices)}


@dataclass(frozen=True)
class SearchSpace:
    path: Path
    dimensions: tuple[Range | Choices, ...]

    @property
    def keys(self) -> list[str]:
        return [dimension.key for dimension in self.dimensions]

    def suggest(self, trial) -> dict[str, Any]:
        """A trial's values, one per key, in the file's order."""
        return {dimension.key: dimension.suggest(trial) for dimension in self.dimensions}

    def as_dict(self) -> dict[str, dict]:
        """The space as checked (numbers as numbers): what a resumed search must match."""
        return {dimension.key: dimension.as_dict() for dimension in self.dimensions}


def with_values(cfg: Config, values: Mapping[str, Any]) -> Config:
    """cfg with each dotted key of `values` set, checked as a config file's values are."""
    plain = config_to_dict(cfg)
    for key, value in values.items():
        set_dotted(plain, key, value)
    return config_from_dict(plain)


def load_space(path: str | Path, base: Config, check: Callable[[Config], None] = lambda cfg: None) -> SearchSpace:
    """The space of the file at `path`, each bound and choice checked on `base` with
    `check` (the run's checks: a pooling name, an optimizer the device has)."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"search space file {path.resolve()} does not exist")
    try:
        entries = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SpaceError(f"{path}: not valid YAML: {yaml_problem(err)}") from None
    if not isinstance(entries, dict) or not entries:
        raise SpaceError(f"{path}: expected a mapping of config keys to a range or choices, e.g. "
                         "'training.lr: {low: 1.0e-5, high: 1.0e-4, log: true}', got "
                         f"{'nothing' if entries is None else repr(entries)}")
    return SearchSpace(path, tuple(_dimension(path, str(key), spec, base, check) for key, spec in entries.items()))


def _dimension(path: Path, key: str, spec: Any, base: Config, check: Callable[[Config], None]) -> Range | Choices:
    def fail(expected: str, got: Any) -> SpaceError:
        return SpaceError(f"{path}: '{key}': expected {expected}, got {got}")

    tp = _key_type(path, key)
    nullable, tp = _without_none(tp)
    if not isinstance(spec, dict):
        raise fail("{low: ..., high: ...} or {choices: [...]}", repr(spec))
    unknown = [name for name in spec if name not in (*RANGE_FIELDS, "choices")]
    if unknown:
        raise fail("the fields low, high, log, step or choices", f"{', '.join(map(str, unknown))}")
    if "choices" in spec:
        if any(name in spec for name in RANGE_FIELDS):
            raise fail("either choices or a range (low, high), not both", ", ".join(map(str, spec)))
        dimension = _choices(key, spec["choices"], tp, nullable, fail)
        checked = dimension.choices
    else:
        dimension = _range(key, spec, tp, fail)
        checked = (dimension.low, dimension.high)
    for value in checked:
        try:
            check(with_values(base, {key: value}))
        except ConfigError as err:
            raise SpaceError(f"{path}: '{key}': the value {value!r} is refused: {err}") from None
    return dimension


def _choices(key: str, choices: Any, tp: Any, nullable: bool, fail) -> Choices:
    if not isinstance(choices, list) or not choices:
        raise fail("choices as a non-empty list, e.g. {choices: [a, b]}", repr(choices))
    expected = _type_words(tp) + (" or null" if nullable else "")
    values = []
    for choice in choices:
        value = None if choice is None and nullable else _typed(choice, tp)
        if value is _WRONG:
            raise fail(f"choices that are {expected}", repr(choice))
        values.append(value)
    if len(set(map(repr, values))) != len(values):
        raise fail("distinct choices", repr(choices))
    return Choices(key, tuple(values))


def _range(key: str, spec: dict, tp: Any, fail) -> Range:
    if tp not in (int, float):
        raise fail(f"{{choices: [...]}} (the key takes {_type_words(tp)}, not a range)", "a range")
    if "low" not in spec or "high" not in spec:
        raise fail("both low and high", ", ".join(map(str, spec)))
    low, high = (_typed(spec[name], tp) for name in ("low", "high"))
    for name, value in (("low", low), ("high", high)):
        if value is _WRONG:
            raise fail(f"{_type_words(tp)} as {name}", repr(spec[name]))
    if low > high:
        raise fail("low <= high", f"low {low!r} > high {high!r}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise fail("log: true or false", repr(log))
    step = spec.get("step")
    if step is not None:
        step = _typed(step, tp)
        if step is _WRONG or step <= 0:
            raise fail(f"step: {_type_words(tp)} > 0", repr(spec["step"]))
        if log:
            raise fail("step or log: true, not both", "both")
    if log and low <= 0:
        raise fail("low > 0 with log: true", f"low {low!r}")
    return Range(key, low, high, integer=tp is int, log=log, step=step)


_WRONG = object()       # a value that is not of the key's type


def _typed(value: Any, tp: Any) -> Any:
    """value as type tp (a YAML 1e-5 is a string: a number to the user), or _WRONG."""
    if typing.get_origin(tp) is Literal:
        return value if value in typing.get_args(tp) else _WRONG
    if tp is bool:
        return value if isinstance(value, bool) else _WRONG
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _WRONG
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return _WRONG
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else _WRONG
    if tp is str:
        return value if isinstance(value, str) else _WRONG
    return _WRONG


def _type_words(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]


def _without_none(tp: Any) -> tuple[bool, Any]:
    """(whether the key takes null, its type without None)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        others = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        return len(others) < len(typing.get_args(tp)), others[0]
    return False, tp


def _key_type(path: Path, key: str) -> Any:
    """The type of a dotted config key, from the Config dataclasses; a SpaceError for a
    key that is not one, a section, a fixed section's key or a list-valued key."""
    cls, parts = Config, key.split(".")
    for depth, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            keys = list(flatten(config_to_dict(Config())))
            close = difflib.get_close_matches(key, keys, n=1)
            guess = f" (did you mean '{close[0]}'?)" if close else ""
            raise SpaceError(f"{path}: '{key}' is not a config key{guess}")
        tp = hints[part]
        if depth == 0 and part in FIXED_SECTIONS:
            raise SpaceError(f"{path}: '{key}': the trials keep the base config's {FIXED_SECTIONS[part]}")
        if dataclasses.is_dataclass(tp):
            if depth == len(parts) - 1:
                raise SpaceError(f"{path}: '{key}' is a section: expected one of its keys, e.g. "
                                 f"'{key}.{dataclasses.fields(tp)[0].name}'")
            cls = tp
            continue
        if depth < len(parts) - 1:
            raise SpaceError(f"{path}: '{key}' is not a config key ('{'.'.join(parts[:depth + 1])}' is not a section)")
        if typing.get_origin(_without_none(tp)[1]) is tuple:
            raise SpaceError(f"{path}: '{key}' holds a list, which the search cannot vary: expected a key of "
                             "one value")
        return tp
    raise AssertionError("unreachable: a key has at least one part")
