"""The train section: device, optimiser, schedule, budget, checkpoints, recovery and loggers, with
the durations (90s, 10m, 1h30m) its time settings accept."""

from __future__ import annotations

import re
from typing import Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from charlm.config.base import Section

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


_DEVICE_RE = re.compile(r"auto|cpu|cuda|cuda:\d+|mps")
Logger = Literal["jsonl", "tensorboard", "mlflow"]  # where training events go (charlm.training.loggers)
LOGGERS: tuple[str, ...] = get_args(Logger)


class TrainConfig(Section):
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
