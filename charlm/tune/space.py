"""The search space: a YAML file mapping dotted config keys (as `--set` takes them) to a list of
choices or a range {low, high, log, step}, validated once against the config schema, and how a
trial draws its values."""

from __future__ import annotations

import copy
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from charlm.config import SECTIONS, Config, ConfigError, did_you_mean, read_config_file, validate_config
from charlm.errors import UserError
from charlm.tune.credentials import carries_credentials

EXAMPLE = "e.g. model.hidden_size: [128, 256] or train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}"
_SCALARS = (str, int, float, bool, type(None))  # what an Optuna categorical can hold


class SpaceError(UserError):
    """A space file that cannot be searched."""


class Range(BaseModel):
    """A numeric range; `log` samples evenly in log space, `step` on a grid from low."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    low: int | float
    high: int | float
    log: bool = False
    step: int | float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _well_formed(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low must be below high (got low {self.low}, high {self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got low {self.low})")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined; drop one")
        if self.step is not None and not _whole((self.high - self.low) / self.step):
            raise ValueError(
                f"high - low must be a whole number of steps (got {self.high} - {self.low} with step {self.step})"
            )
        return self


@dataclass(frozen=True)
class Param:
    """One searched key: a list of choices, or a range of int or float values."""

    key: str
    choices: tuple | None = None
    range: Range | None = None
    integer: bool = False

    def suggest(self, trial) -> Any:
        """The value of this key for an Optuna trial (a stored trial gets back its own value)."""
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        r = self.span
        if self.integer:
            return trial.suggest_int(self.key, int(r.low), int(r.high), step=int(r.step or 1), log=r.log)
        return trial.suggest_float(self.key, float(r.low), float(r.high), step=r.step, log=r.log)

    def endpoints(self) -> tuple:
        """The values that must each make a valid config before any trial runs."""
        return self.choices if self.choices is not None else (self.span.low, self.span.high)

    @property
    def span(self) -> Range:
        """The range of a key searched without a list of choices."""
        assert self.range is not None, "a Param holds either choices or a range"
        return self.range


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]


def load_space(path: Path, base: Config, fixed: tuple[str, ...] = ()) -> Space:
    """Read and check a space file against the (already validated) base config; `fixed` are the
    keys given with --set, which the space must not search too. Every problem is one line."""
    problems, params = [], []
    for key, spec in _read(path).items():
        try:
            params.append(_param(str(key), spec, fixed))
        except SpaceError as err:
            problems.append(f"{path}: {err}")
    for param in params:
        problems += [f"{path}: {line}" for line in _check_values(param, base)]
    if problems:
        raise SpaceError("\n".join(problems))
    return Space(tuple(params))


def apply_params(base: Config, params: dict[str, Any], source: str) -> Config:
    """The base config with a trial's values laid over it, validated."""
    raw = base.to_dict()
    for key, value in params.items():
        section, name = key.split(".")
        raw[section][name] = value
    return validate_config(raw, source)


def _read(path: Path) -> dict:
    if not path.is_file():
        raise SpaceError(
            f"space file not found: {path}"
            if not path.exists()
            else f"space path is a directory, not a YAML file: {path}"
        )
    try:
        raw = read_config_file(path)
    except ConfigError as err:
        if "empty" in str(err) or "must be a YAML mapping" in str(err):
            raise SpaceError(f"{path}: a space file maps config keys to choices or ranges, {EXAMPLE}") from None
        raise
    return raw


def _param(key: str, spec: Any, fixed: tuple[str, ...]) -> Param:
    kind = _field_kind(key)
    if key in fixed:
        raise SpaceError(f"{key}: given with --set and searched in the space; drop one")
    if isinstance(spec, list):
        return Param(key, choices=_choices(key, spec))
    if not isinstance(spec, dict):
        raise SpaceError(f"{key}: give a list of choices or a range {{low, high}}, {EXAMPLE} (got {spec!r})")
    if kind is None:
        raise SpaceError(f"{key}: a range needs a number key; give a list of choices instead")
    try:
        span = Range.model_validate(spec)
    except ValidationError as err:
        raise SpaceError("; ".join(_describe(key, e) for e in err.errors())) from None
    if kind is int:
        given = [v for v in (span.low, span.high, span.step) if v is not None]
        if any(not float(v).is_integer() for v in given):
            raise SpaceError(
                f"{key}: takes whole numbers; low, high and step must be integers "
                f"(got {', '.join(repr(v) for v in given)})"
            )
    return Param(key, range=span, integer=kind is int)


def _field_kind(key: str) -> type | None:
    """int or float for a number key, None for any other; unknown keys are errors, with a suggestion."""
    parts = key.split(".")
    if len(parts) != 2 or not all(parts):
        raise SpaceError(f"{key}: a key must be section.name as --set takes it, {EXAMPLE}")
    section, name = parts
    if section not in SECTIONS:
        raise SpaceError(f"{key}: unknown section '{section}'{did_you_mean(section, list(SECTIONS))}")
    fields = SECTIONS[section].model_fields
    if name not in fields:
        raise SpaceError(f"{key}: unknown key{did_you_mean(name, list(fields))}")
    annotation = fields[name].annotation
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        annotation = members[0] if len(members) == 1 else None
    return int if annotation is int else float if annotation is float else None


def _choices(key: str, values: list) -> tuple:
    if not values:
        raise SpaceError(f"{key}: the list of choices is empty")
    odd = [v for v in values if not isinstance(v, _SCALARS)]
    if odd:
        raise SpaceError(
            f"{key}: each choice must be a single value (a number, text, true/false or null); got {odd[0]!r}"
        )
    repeated = [v for i, v in enumerate(values) if v in values[:i]]
    if repeated:
        raise SpaceError(f"{key}: the choice {repeated[0]!r} is listed twice")
    secret = [i for i, v in enumerate(values, 1) if carries_credentials(v)]
    if secret:  # a searched value is stored in the study database, which other workers and tools read
        raise SpaceError(
            f"{key}: choice {secret[0]} carries credentials (user:password@ or a secret query value), "
            "which the study database would store; give them in the config file (or with --set) "
            "and search only what has none"
        )
    return tuple(values)


def _check_values(param: Param, base: Config) -> list[str]:
    """Each choice (each end of a range) laid over the base config alone must validate."""
    problems = []
    section, name = param.key.split(".")
    for value in param.endpoints():
        raw = copy.deepcopy(base.to_dict())
        raw[section][name] = value
        try:
            validate_config(raw, "")
        except ConfigError as err:
            details = "; ".join(line.removeprefix(": ") for line in str(err).splitlines())
            problems.append(f"{param.key}: {value!r} makes an invalid config: {details}")
    return problems


def _describe(key: str, error: Mapping[str, Any]) -> str:
    where = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown range setting '{where}'; a range takes low, high, log and step"
    if error["type"] == "missing":
        return f"{key}: a range needs {where}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{key}: {where + ': ' if where else ''}{message}"


def _whole(x: float) -> bool:
    return math.isclose(x, round(x), rel_tol=0, abs_tol=1e-9)
