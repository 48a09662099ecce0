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
    """The text to learn from, how it is split into training and validation, and how it becomes a vocabulary
    of characters (or bytes)."""

    path: str = Field(
        min_length=1,
        description="The training text: a file, a folder, a glob such as `texts/*.txt`, or `builtin:python-stdlib`.",
    )
    val_path: str | None = Field(
        None,
        description="The validation text, in the same forms as `path`. `null`: the last `val_fraction` of `path` "
        "is held out instead.",
    )
    val_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="The fraction of `path` held out for validation, as one contiguous tail (never shuffled in). "
        "Ignored when `val_path` is set.",
    )
    unit: Literal["chars", "bytes"] = Field(
        "chars",
        description="What one symbol is: `chars` (Unicode code points) or `bytes` (UTF-8 bytes, a vocabulary of "
        "at most 256).",
    )
    normalize: Literal["none", "NFC", "NFKC"] = Field(
        "none",
        description="Unicode normalisation applied to the text before anything else: `none`, `NFC` or `NFKC`.",
    )
    newlines: Literal["keep", "lf"] = Field(
        "keep",
        description="`keep` leaves line endings as they are; `lf` turns CRLF and CR into LF.",
    )
    documents: Literal["none", "lines"] = Field(
        "none",
        description="`none` reads the text as one stream; `lines` makes each non-empty line a document between "
        "`<bos>` and `<eos>` markers.",
    )
    min_freq: int = Field(
        1,
        gt=0,
        description="Characters seen fewer times than this in the training text become `<unk>`.",
    )
    max_vocab: int | None = Field(
        None,
        ge=2,
        description="Keep only this many of the most frequent characters, `<unk>` and markers included; the rest "
        "become `<unk>`. `null`: no limit.",
    )
    on_decode_error: Literal["error", "skip"] = Field(
        "error",
        description="What to do with a file that is not UTF-8: `error` stops, naming the file and the byte offset; "
        "`skip` leaves the file out with a warning.",
    )


class SampleConfig(Section):
    """Defaults for `charlm sample`, whose options override them. The short previews printed during training use
    the same prompt and decoding settings."""

    prompt: str = Field(
        "\n",
        description="The text generation starts from when no prompt is given. Characters the training text lacked "
        "become `<unk>` (with a warning) where the vocabulary has it, else they are an error; a prompt that leaves "
        "nothing to start from (the default newline, for a text without newlines) starts from the vocabulary's "
        "first character.",
    )
    length: int = Field(
        500,
        gt=0,
        le=1_000_000,  # more is almost certainly a typo
        description="How many characters to generate.",
    )
    temperature: float = Field(
        0.8,
        ge=0,
        description="Divides the logits before sampling: below 1 is more conservative, above 1 more varied; `0` "
        "is greedy (always the most likely character).",
    )
    top_k: int | None = Field(
        None,
        gt=0,
        description="Draw only among the k most likely characters. `null`: no limit.",
    )
    top_p: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Nucleus sampling: draw only from the smallest set of most likely characters whose "
        "probabilities add up to p. `null`: off.",
    )
    seed: int | None = Field(
        None,
        ge=0,
        description="The sampling seed, for a repeatable sample. `null`: a fresh seed is drawn and printed.",
    )


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
