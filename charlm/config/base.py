"""What every config section stands on: the frozen pydantic base that forbids unknown keys, and
ConfigError, the user error a config that cannot be made valid becomes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from charlm.errors import UserError


class ConfigError(UserError):
    """A config file or override that cannot be turned into a valid Config."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
