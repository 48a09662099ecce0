"""The typed config schema: the whole Config of four frozen sections (data and sample here; model
and train in their own modules), SECTIONS by name, and a config with absolute paths."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from charlm.config.base import Section
from charlm.config.model import ModelConfig
from charlm.config.train import TrainConfig


class DataConfig(Section):
    path: str = Field(min_length=1)
    val_path: str | None = None
    val_fraction: float = Field(0.1, gt=0, lt=1)
    unit: Literal["chars", "bytes"] = "chars"
    normalize: Literal["none", "NFC", "NFKC"] = "none"
    newlines: Literal["keep", "lf"] = "keep"
    documents: Literal["none", "lines"] = "none"
    min_freq: int = Field(1, gt=0)
    max_vocab: int | None = Field(None, ge=2)
    on_decode_error: Literal["error", "skip"] = "error"


class SampleConfig(Section):
    prompt: str = "\n"
    length: int = Field(500, gt=0, le=1_000_000)  # more is almost certainly a typo
    temperature: float = Field(0.8, ge=0)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0)


class Config(Section):
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig
    sample: SampleConfig = SampleConfig()

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def with_absolute_paths(cfg: Config) -> Config:
    """The config with its data paths (and train.init_from) made absolute, so a run dir's config works from anywhere."""

    def absolute(spec: str | None) -> str | None:
        if spec is None or spec.startswith("builtin:"):
            return spec
        return str(Path(spec).expanduser().absolute())

    data = cfg.data.model_copy(update={"path": absolute(cfg.data.path), "val_path": absolute(cfg.data.val_path)})
    train = cfg.train.model_copy(update={"init_from": absolute(cfg.train.init_from)})
    return cfg.model_copy(update={"data": data, "train": train})


SECTIONS: dict[str, type[BaseModel]] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
}
