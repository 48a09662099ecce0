"""The typed config schema: four frozen sections (data, model, train, sample) and their checks."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

import charlm.models.registry as registry
from charlm.errors import UserError


class ConfigError(UserError):
    """A config file or override that cannot be turned into a valid Config."""


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")


def parse_duration(value: str | int | float) -> float:
    """'90s', '10m', '2h', '1h30m' or a plain number of seconds -> seconds."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):  # YAML gives `0:` as a mapping
        raise ValueError(f"must be a duration such as 90s, 10m or 2h (got {value!r})")
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
    val_path: str | None = None
    val_fraction: float = Field(0.1, gt=0, lt=1)
    unit: Literal["chars", "bytes"] = "chars"
    normalize: Literal["none", "NFC", "NFKC"] = "none"
    newlines: Literal["keep", "lf"] = "keep"
    documents: Literal["none", "lines"] = "none"
    min_freq: int = Field(1, gt=0)
    max_vocab: int | None = Field(None, ge=2)
    on_decode_error: Literal["error", "skip"] = "error"


# Both lists come from the cell-type registry, a torch-free leaf of charlm.models.
if TYPE_CHECKING:  # a Literal built at run time is beyond mypy: to it, both are plain strings
    Backend: TypeAlias = str
    CellType: TypeAlias = str
else:
    Backend = Literal[registry.BACKEND_CHOICES]  # auto or a concrete backend
    CellType = Literal[registry.CELL_TYPES]
BACKEND_CHOICES: tuple[str, ...] = get_args(Backend)  # what model.backend and --backend accept
BACKENDS: tuple[str, ...] = registry.BACKENDS  # the concrete ones a model runs on


# What a machine could hold. A parameter is 4 bytes of float32 and training keeps three more copies
# (its gradient and Adam's two moments): 16 bytes. 2**33 parameters (8.6e9) are 34 GB to load and
# 137 GB to train, the whole memory of the largest single accelerator (an H200, 141 GB), and some
# thousand times any character-level RNN yet trained. Each size has its own bound as well, so a
# crafted file is refused by the field it got wrong, before anything is multiplied or allocated.
MAX_PARAMETERS = 2**33
MAX_WIDTH = 2**20  # hidden_size, embedding_dim: a 2**20-wide layer alone is 2**42 weights, already refused
MAX_LAYERS = 1024
MAX_GATES = 4  # the most gate blocks of any cell type (LSTM: i, f, g, o): the count below is an upper bound


class ModelConfig(_Section):
    type: CellType = "lstm"
    hidden_size: int = Field(256, gt=0, le=MAX_WIDTH)
    num_layers: int = Field(2, gt=0, le=MAX_LAYERS)
    dropout: float = Field(0.0, ge=0, lt=1)
    weight_dropout: float = Field(0.0, ge=0, lt=1)  # DropConnect on the recurrent weights
    locked_dropout: bool = False  # dropout masks held for all steps of a window (variational dropout)
    input_dropout: float = Field(0.0, ge=0, lt=1)  # on the embedded (or one-hot) input
    embedding_dropout: float = Field(0.0, ge=0, lt=1)  # whole characters' embedding rows
    input: Literal["onehot", "embedding"] = "embedding"
    embedding_dim: int = Field(64, gt=0, le=MAX_WIDTH)
    backend: Backend = registry.AUTO  # kept as written; the run resolves auto (registry.resolve_backend)

    def parameter_bound(self, vocab_size: int) -> int:
        """At least the parameters of this model over `vocab_size` symbols (MAX_GATES gate blocks per layer)."""
        hidden, gates = self.hidden_size, MAX_GATES
        width_in = self.embedding_dim if self.input == "embedding" else vocab_size
        embedding = vocab_size * self.embedding_dim if self.input == "embedding" else 0
        first = gates * hidden * (width_in + hidden + 2)
        others = (self.num_layers - 1) * gates * hidden * (2 * hidden + 2)
        head = (hidden + 1) * vocab_size
        return embedding + first + others + head

    def check_fits(self, vocab_size: int, source: str = "config") -> None:
        """Refuse, before anything is allocated, a model no machine could hold (MAX_PARAMETERS)."""
        bound = self.parameter_bound(vocab_size)
        if bound > MAX_PARAMETERS:
            raise ConfigError(
                f"{source}: model.hidden_size {self.hidden_size}, num_layers {self.num_layers} and "
                f"embedding_dim {self.embedding_dim} with a vocabulary of {vocab_size:,} make "
                f"~{bound:.2g} parameters, more than a machine can hold ({MAX_PARAMETERS:.2g})"
            )

    @model_validator(mode="after")
    def _fits_a_machine(self) -> ModelConfig:
        bound = self.parameter_bound(2)  # the smallest vocabulary; the real one is checked where it is known
        if bound > MAX_PARAMETERS:
            raise ValueError(
                f"hidden_size {self.hidden_size}, num_layers {self.num_layers} and embedding_dim "
                f"{self.embedding_dim} make ~{bound:.2g} parameters, more than a machine can hold "
                f"({MAX_PARAMETERS:.2g})"
            )
        return self

    @model_validator(mode="after")
    def _embedding_dropout_needs_embedding(self) -> ModelConfig:
        if self.embedding_dropout > 0 and self.input != "embedding":
            raise ValueError(
                "model.embedding_dropout needs model.input: embedding (one-hot input has no embedding "
                "rows to drop; use model.input_dropout)"
            )
        return self

    # `type` is validated before these (field order), so info.data holds it when it is valid.
    @field_validator("weight_dropout")
    @classmethod
    def _cell_type_has_recurrent_weights(cls, value: float, info: ValidationInfo) -> float:
        if "type" in info.data:
            registry.lookup(info.data["type"]).check_weight_dropout(value)
        return value

    @field_validator("backend")
    @classmethod
    def _cell_type_runs_on_backend(cls, value: str, info: ValidationInfo) -> str:
        if "type" in info.data and value != registry.AUTO:  # auto always resolves to one the type runs on
            registry.lookup(info.data["type"]).check_backend(value)
        return value


_DEVICE_RE = re.compile(r"auto|cpu|cuda|cuda:\d+|mps")
Logger = Literal["jsonl", "tensorboard", "mlflow"]  # where training events go (charlm.training.loggers)
LOGGERS: tuple[str, ...] = get_args(Logger)


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
    ema_decay: float | None = Field(None, gt=0, lt=1)  # validate/save/sample an average of the weights
    ar: float = Field(0.0, ge=0)  # activation regularisation: ar * mean(h_dropped^2) of the top layer
    tar: float = Field(0.0, ge=0)  # temporal activation regularisation: tar * mean((h_t - h_{t-1})^2)
    max_steps: int | None = Field(None, gt=0)
    max_time: str | None = None
    eval_interval: int = Field(500, gt=0)
    log_interval: int = Field(50, gt=0)
    eval_batch_size: int = Field(64, gt=0)
    checkpoint_interval: int | str | None = None  # steps, or a duration such as "10m"
    patience: int | None = Field(None, gt=0)
    max_bad_steps: int = Field(10, gt=0)
    rollback_lr_factor: float = Field(0.5, gt=0, lt=1)
    max_rollbacks: int = Field(3, ge=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    threads: int | None = Field(None, gt=0)  # CPU threads; None: the machine's physical cores
    loggers: list[Logger] = ["jsonl"]  # metrics.jsonl is always written; tensorboard and mlflow need charlm[track]
    mlflow_uri: str | None = Field(None, min_length=1)  # None: sqlite:///<run dir>/mlflow.db
    mlflow_experiment: str | None = Field(None, min_length=1)  # None: the run dir's name
    # seconds one TensorBoard/MLflow call may take before that logger is turned off for the run (and
    # the most the run's end waits for them); an hour at most: a bound that never fires is no bound
    logger_timeout: float = Field(60.0, gt=0, le=3600)
    # start from a trained model's weights: a checkpoint file or run dir (README, Fine-tuning)
    init_from: str | None = None
    # parts left as they are: embedding, head, rnn.<k> or a parameter-name prefix
    freeze: list[str] = Field(default_factory=list)

    @field_validator("freeze")
    @classmethod
    def _names_given(cls, value: list[str]) -> list[str]:
        if any(not name.strip() for name in value):
            raise ValueError("names must not be empty (e.g. [embedding, rnn.0])")
        return [name.strip() for name in value]

    @field_validator("loggers", mode="before")
    @classmethod
    def _known_loggers(cls, value: Any) -> Any:
        names = [value] if isinstance(value, str) else value  # --set train.loggers=tensorboard
        if not isinstance(names, list):
            return value
        unknown = [name for name in names if name not in LOGGERS]
        if unknown:
            raise ValueError(f"each name must be {', '.join(LOGGERS[:-1])} or {LOGGERS[-1]} (got {unknown[0]!r})")
        return list(dict.fromkeys(names))

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
    def checkpoint_steps(self) -> int | None:
        return self.checkpoint_interval if isinstance(self.checkpoint_interval, int) else None

    @property
    def checkpoint_seconds(self) -> float | None:
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
    def _has_budget(self) -> TrainConfig:
        if self.max_steps is None and self.max_time is None:
            raise ValueError("set train.max_steps or train.max_time (or both) so training knows when to stop")
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr ({self.min_lr}) must not exceed train.lr ({self.lr})")
        return self

    @property
    def max_time_seconds(self) -> float | None:
        return None if self.max_time is None else parse_duration(self.max_time)


class SampleConfig(_Section):
    prompt: str = "\n"
    length: int = Field(500, gt=0, le=1_000_000)  # more is almost certainly a typo
    temperature: float = Field(0.8, ge=0)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0)


class Config(_Section):
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
