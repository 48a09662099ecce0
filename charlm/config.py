"""The typed config schema and its loader: YAML + `--set` overrides -> validated `Config`.

This is the only module that reads YAML config. Everything below it takes these objects.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from charlm.errors import UserError


class ConfigError(UserError):
    """A config file or override that cannot be turned into a valid Config."""


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")


def parse_duration(value: str | int | float) -> float:
    """'90s', '10m', '2h', '1h30m' or a plain number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 90s, 10m or 2h")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip().lower()
        parts = _DURATION_RE.findall(text)
        if not parts or _DURATION_RE.sub("", text).strip():
            raise ValueError(f"must be a duration such as 90s, 10m or 2h (got {value!r})")
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"must be a positive duration (got {value!r})")
    return seconds


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    path: str = Field(min_length=1)
    val_path: Optional[str] = None
    val_fraction: float = Field(0.1, gt=0, lt=1)
    unit: Literal["chars", "bytes"] = "chars"
    normalize: Literal["none", "NFC", "NFKC"] = "none"
    newlines: Literal["keep", "lf"] = "keep"
    documents: Literal["none", "lines"] = "none"
    min_freq: int = Field(1, gt=0)
    max_vocab: Optional[int] = Field(None, ge=2)
    on_decode_error: Literal["error", "skip"] = "error"


class ModelConfig(_Section):
    type: Literal["rnn", "lstm", "gru"] = "lstm"
    hidden_size: int = Field(256, gt=0)
    num_layers: int = Field(2, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    weight_dropout: float = Field(0.0, ge=0, lt=1)  # DropConnect on the recurrent weights
    input: Literal["onehot", "embedding"] = "embedding"
    embedding_dim: int = Field(64, gt=0)
    backend: Literal["native", "fused", "reference"] = "native"


_DEVICE_RE = re.compile(r"auto|cpu|cuda|cuda:\d+|mps")


class TrainConfig(_Section):
    device: str = "auto"
    seed: int = Field(1337, ge=0)
    batch_size: int = Field(32, gt=0)
    seq_len: int = Field(128, gt=0)
    random_offsets: bool = False  # shift each epoch's window boundaries by a random 0..T-1
    lr: float = Field(2e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    ema_decay: Optional[float] = Field(None, gt=0, lt=1)  # validate/save/sample an average of the weights
    max_steps: Optional[int] = Field(None, gt=0)
    max_time: Optional[str] = None
    eval_interval: int = Field(500, gt=0)
    log_interval: int = Field(50, gt=0)
    eval_batch_size: int = Field(64, gt=0)
    checkpoint_interval: Optional[Union[int, str]] = None  # steps, or a duration such as "10m"
    patience: Optional[int] = Field(None, gt=0)
    max_bad_steps: int = Field(10, gt=0)
    rollback_lr_factor: float = Field(0.5, gt=0, lt=1)
    max_rollbacks: int = Field(3, ge=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False

    @field_validator("checkpoint_interval", mode="before")
    @classmethod
    def _steps_or_duration(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            if value <= 0:
                raise ValueError(f"must be a positive number of steps or a duration such as 10m (got {value})")
            return value
        try:
            parse_duration(value if isinstance(value, str) else "")
        except ValueError:
            raise ValueError(f"must be a number of steps or a duration such as 10m (got {value!r})") from None
        return value

    @property
    def checkpoint_steps(self) -> Optional[int]:
        return self.checkpoint_interval if isinstance(self.checkpoint_interval, int) else None

    @property
    def checkpoint_seconds(self) -> Optional[float]:
        value = self.checkpoint_interval
        return parse_duration(value) if isinstance(value, str) else None

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE_RE.fullmatch(value):
            raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps (got {value!r})")
        return value

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"each beta must be in [0, 1) (got {list(value)})")
        return value

    @field_validator("max_time", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        if value is None:
            return None
        parse_duration(value)
        return str(value)

    @model_validator(mode="after")
    def _has_budget(self) -> "TrainConfig":
        if self.max_steps is None and self.max_time is None:
            raise ValueError("set train.max_steps or train.max_time (or both) so training knows when to stop")
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr ({self.min_lr}) must not exceed train.lr ({self.lr})")
        return self

    @property
    def max_time_seconds(self) -> Optional[float]:
        return None if self.max_time is None else parse_duration(self.max_time)


class SampleConfig(_Section):
    prompt: str = "\n"
    length: int = Field(500, gt=0, le=1_000_000)  # more is almost certainly a typo
    temperature: float = Field(0.8, ge=0)
    top_k: Optional[int] = Field(None, gt=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = Field(None, ge=0)


class Config(_Section):
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig
    sample: SampleConfig = SampleConfig()

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def with_absolute_paths(cfg: Config) -> Config:
    """The config with its data paths made absolute, so a run dir's config works from anywhere."""
    def absolute(spec: Optional[str]) -> Optional[str]:
        if spec is None or spec.startswith("builtin:"):
            return spec
        return str(Path(spec).expanduser().absolute())

    data = cfg.data.model_copy(update={"path": absolute(cfg.data.path), "val_path": absolute(cfg.data.val_path)})
    return cfg.model_copy(update={"data": data})


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
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (line {line})",
                                                    key_node.start_mark)
        seen[key] = loader.construct_object(value_node, deep=True)
    return seen


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_without_duplicates)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
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
        raise ConfigError(f"{path}: a config must be a YAML mapping of sections (data, model, train, sample), "
                          f"not a {type(raw).__name__}")
    return raw


# --- overrides ----------------------------------------------------------------------------

_SECTIONS: dict[str, type[BaseModel]] = {
    "data": DataConfig, "model": ModelConfig, "train": TrainConfig, "sample": SampleConfig,
}


def _closest(name: str, options: list[str]) -> str:
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
    if section not in _SECTIONS:
        raise ConfigError(f"--set {key}: unknown section '{section}'{_closest(section, list(_SECTIONS))}")
    if name not in _known_keys(_SECTIONS[section]):
        raise ConfigError(f"--set {key}: unknown key{_closest(name, _known_keys(_SECTIONS[section]))}")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: cannot parse value {value_text!r} as YAML") from None
    target = raw.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"--set {key}: section '{section}' in the config file is not a mapping")
    target[name] = value


# --- validation ---------------------------------------------------------------------------


def _describe_error(error: dict) -> str:
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
        return f"{dotted}: unknown section{_closest(str(loc[0]), list(_SECTIONS))}"
    section = _SECTIONS.get(str(loc[0]))
    options = _known_keys(section) if section else []
    return f"{dotted}: unknown key{_closest(str(loc[-1]), options)}"


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
        problems = [f"--{str(e['loc'][0]).replace('_', '-')}: " + _describe_error({**e, "loc": ()})
                    for e in err.errors()]
        raise ConfigError("\n".join(problems)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply `--set` overrides and validate: the single entry point."""
    raw = read_config_file(path)
    for assignment in overrides:
        apply_override(raw, assignment)
    return validate_config(raw, str(path))
