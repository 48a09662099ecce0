"""The config: a YAML file (plus `--set` overrides) becomes typed, validated objects once, here.

`schema` holds the four frozen sections and their checks; `loading` reads and writes YAML
(the only module that imports yaml), applies overrides and turns every validation problem
into one line naming its dotted key. Imports only charlm.errors and charlm.models.registry (a
torch-free leaf: the cell types and backends): every other package may import the config.
"""

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
from charlm.config.redact import redact_uri
from charlm.config.schema import (
    BACKEND_CHOICES,
    BACKENDS,
    SECTIONS,
    Backend,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    SampleConfig,
    TrainConfig,
    parse_duration,
    with_absolute_paths,
)

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
