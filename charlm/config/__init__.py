"""The config: a YAML file (plus `--set` overrides) becomes typed, validated objects once, here.

`schema` holds the whole Config with its data and sample sections; `model` and `train` the two
larger sections and their checks; `base` the frozen section base and ConfigError; `loading`
reads and writes YAML (the only module that imports yaml), applies overrides and turns every
validation problem into one line naming its dotted key. Imports only charlm.errors and charlm.models.registry (a
torch-free leaf: the cell types and backends): every other package may import the config.
"""

from charlm.config.base import ConfigError
from charlm.config.durations import parse_duration
from charlm.config.loading import (
    apply_override,
    config_yaml,
    did_you_mean,
    load_config,
    read_config_file,
    read_yaml_mapping,
    sample_settings,
    validate_config,
)
from charlm.config.model import BACKEND_CHOICES, BACKENDS, Backend, ModelConfig
from charlm.config.redact import redact_uri
from charlm.config.schema import SECTIONS, Config, DataConfig, SampleConfig, with_absolute_paths
from charlm.config.train import TrainConfig

__all__ = [
    "BACKEND_CHOICES",
    "BACKENDS",
    "SECTIONS",
    "Backend",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "SampleConfig",
    "TrainConfig",
    "apply_override",
    "config_yaml",
    "did_you_mean",
    "load_config",
    "parse_duration",
    "read_config_file",
    "read_yaml_mapping",
    "redact_uri",
    "sample_settings",
    "validate_config",
    "with_absolute_paths",
]
