"""Reading and writing configs as YAML: the file, `--set` overrides, validation into a `Config`,
and one message per problem. The only module that imports yaml."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from charlm.config.base import ConfigError
from charlm.config.schema import SECTIONS, Config, SampleConfig

# --- YAML reading -------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """safe_load that rejects duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    seen: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            line = key_node.start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {line})", key_node.start_mark
            )
        seen[key] = loader.construct_object(value_node, deep=True)
    return seen


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_without_duplicates)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # safe: _StrictLoader is a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        if "\t" in text and "'\\t'" in str(err):
            problem = "tabs are not allowed for indentation in YAML; use spaces"
        raise ConfigError(f"{source}: invalid YAML{where}: {problem}") from None


def read_config_file(path: str | Path) -> dict:
    """The raw mapping of a YAML config file, with friendly errors."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"config path is a directory, not a YAML file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {err.start})") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    raw = _parse_yaml(text, str(path))
    if raw is None:
        raise ConfigError(f"{path}: the config file is empty; it needs at least data.path and a train budget")
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: a config must be a YAML mapping of sections (data, model, train, sample), "
            f"not a {type(raw).__name__}"
        )
    return raw


# --- overrides ----------------------------------------------------------------------------


def did_you_mean(name: str, options: list[str]) -> str:
    """The end of an unknown-name message: the closest option, else all of them."""
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(options)}"


def _known_keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `section.key=value` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set train.lr=1e-3")
    key, _, value_text = assignment.partition("=")
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {assignment!r}: the key must be section.name, e.g. train.lr")
    section, name = parts
    if section not in SECTIONS:
        raise ConfigError(f"--set {key}: unknown section '{section}'{did_you_mean(section, list(SECTIONS))}")
    if name not in _known_keys(SECTIONS[section]):
        raise ConfigError(f"--set {key}: unknown key{did_you_mean(name, _known_keys(SECTIONS[section]))}")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: cannot parse value {value_text!r} as YAML") from None
    target = raw.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"--set {key}: section '{section}' in the config file is not a mapping")
    target[name] = value


# --- validation ---------------------------------------------------------------------------


def _describe_error(error: Mapping[str, Any]) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        return _describe_unknown_key(error["loc"])
    if error["type"] == "missing":
        return f"{loc}: required key is missing"
    message = error["msg"]
    message = message.removeprefix("Value error, ")
    message = message[0].lower() + message[1:]
    if error["type"] == "value_error" and not loc:
        return message
    shown = error.get("input")
    got = "" if isinstance(shown, dict) or "got" in message else f" (got {shown!r})"
    return f"{loc}: {message}{got}" if loc else f"{message}{got}"


def _describe_unknown_key(loc: tuple) -> str:
    dotted = ".".join(str(p) for p in loc)
    if len(loc) == 1:
        return f"{dotted}: unknown section{did_you_mean(str(loc[0]), list(SECTIONS))}"
    section = SECTIONS.get(str(loc[0]))
    options = _known_keys(section) if section else []
    return f"{dotted}: unknown key{did_you_mean(str(loc[-1]), options)}"


def validate_config(raw: dict, source: str = "config") -> Config:
    """Turn a raw mapping into a Config, or raise ConfigError listing every problem."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        # One problem per line, each naming the file and the dotted key.
        lines = sorted({_describe_error(e) for e in err.errors()})
        raise ConfigError("\n".join(f"{source}: {line}" for line in lines)) from None


def sample_settings(defaults: SampleConfig, **options: Any) -> SampleConfig:
    """The sample section with command-line options (those not None) laid over it, validated."""
    given = {key: value for key, value in options.items() if value is not None}
    try:
        return SampleConfig.model_validate({**defaults.model_dump(), **given})
    except ValidationError as err:
        problems = [
            f"--{str(e['loc'][0]).replace('_', '-')}: " + _describe_error({**e, "loc": ()}) for e in err.errors()
        ]
        raise ConfigError("\n".join(problems)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply `--set` overrides and validate: the single entry point."""
    raw = read_config_file(path)
    for assignment in overrides:
        apply_override(raw, assignment)
    return validate_config(raw, str(path))


def config_yaml(config: dict) -> str:
    """A resolved config as the YAML text a run dir keeps (keys in schema order, UTF-8 as is)."""
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def read_yaml_mapping(path: Path) -> dict:
    """A YAML file that should hold a mapping (a run dir's config.yaml); {} if it is unreadable."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}
