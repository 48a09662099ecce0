"""The train section: device, optimiser, schedule, budget, checkpoints, recovery and loggers."""

from __future__ import annotations

import re
from typing import Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from charlm.config.base import Section
from charlm.config.durations import parse_duration

_DEVICE_RE = re.compile(r"auto|cpu|cuda|cuda:\d+|mps")
Logger = Literal["jsonl", "tensorboard", "mlflow"]  # where training events go (charlm.training.loggers)
LOGGERS: tuple[str, ...] = get_args(Logger)


class TrainConfig(Section):
    """How training runs: the device, the optimiser (AdamW) and learning-rate schedule, the budget, evaluation and
    checkpoints, recovery from non-finite steps, and where metrics go. At least one budget, `max_steps` or
    `max_time`, is required. Durations are written `90s`, `10m`, `2h`, `1h30m` or as a number of seconds."""

    device: str = Field(
        "auto",
        description="`auto` (CUDA if available, else Apple MPS if available, else the CPU), `cpu`, `cuda`, "
        "`cuda:N` or `mps`; `--device` overrides it. On MPS, bf16 and fp16 configs run in fp32, saying so in "
        "one line.",
    )
    seed: int = Field(
        1337,
        ge=0,
        description="Seeds initialisation, dropout and `random_offsets`: the same seed, config and `max_steps` "
        "budget give the same run on the same machine and backend. With `max_time` the learning-rate schedule "
        "and the stopping step follow the wall clock, so two such runs differ.",
    )
    batch_size: int = Field(
        32,
        gt=0,
        description="Parallel streams per step (B): the training text is cut into this many streams, each read "
        "window by window. Under torchrun the streams are shared out among the processes.",
    )
    seq_len: int = Field(
        128,
        gt=0,
        description="Characters per window (T): how far back gradients flow. The recurrent state is carried "
        "from one window to the next, so the model still learns longer context.",
    )
    random_offsets: bool = Field(
        False,
        description="Shift each epoch's window boundaries (after the first epoch) by a random 0..T-1 characters, "
        "so truncated backpropagation cuts the text at new places every epoch. Costs T-1 characters per epoch.",
    )
    lr: float = Field(2e-3, gt=0, description="The peak learning rate.")
    betas: tuple[float, float] = Field(
        (0.9, 0.99),
        description="AdamW's two betas, each in [0, 1).",
    )
    weight_decay: float = Field(
        0.0,
        ge=0,
        description="AdamW's decoupled weight decay, applied to the weight matrices only.",
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine",
        description="`constant`, or `cosine`: from `lr` down to `min_lr` over the budget.",
    )
    warmup_steps: int = Field(
        0,
        ge=0,
        description="Linear warmup over this many steps, from lr/warmup_steps up to `lr`. `0`: no warmup.",
    )
    min_lr: float = Field(
        0.0,
        ge=0,
        description="Where the cosine schedule ends; must not exceed `lr`.",
    )
    grad_clip: float = Field(
        1.0,
        ge=0,
        description="Clip the global gradient norm to this; `0` turns clipping off.",
    )
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Validate, save and sample an exponential moving average of the weights with this decay "
        "(e.g. `0.998`); see the Training guide. `null`: off.",
    )
    ar: float = Field(
        0.0,
        ge=0,
        description="Activation regularisation: adds `ar` * mean(h^2) of the top layer's outputs (after dropout) "
        "to the objective. `0`: off.",
    )
    tar: float = Field(
        0.0,
        ge=0,
        description="Temporal activation regularisation: adds `tar` * mean((h_t - h_t-1)^2) of the top layer's "
        "outputs (before dropout) to the objective. `0`: off.",
    )
    max_steps: int | None = Field(
        None,
        gt=0,
        description="Stop after this many optimiser steps. At least one of `max_steps` and `max_time` is required.",
    )
    max_time: str | None = Field(
        None,
        description="Stop after this much training time: `90s`, `10m`, `2h`, `1h30m` or a number of seconds. "
        "At least one of `max_steps` and `max_time` is required.",
    )
    eval_interval: int = Field(
        500,
        gt=0,
        description="Steps between validation passes; each one also writes a checkpoint (`last.pt`, and `best.pt` "
        "on a new best validation loss).",
    )
    log_interval: int = Field(
        50,
        gt=0,
        description="Steps between `train` lines in `metrics.jsonl`.",
    )
    eval_batch_size: int = Field(
        64,
        gt=0,
        description="Parallel streams for the validation pass.",
    )
    checkpoint_interval: int | str | None = Field(
        None,
        description="Also write `last.pt` every this many steps (`1000`) or this much time (`10m`), between "
        "evaluations. `null`: only at evaluations.",
    )
    patience: int | None = Field(
        None,
        gt=0,
        description="Stop early after this many validation passes in a row without a new best validation loss. "
        "`null`: never stop early.",
    )
    max_bad_steps: int = Field(
        10,
        gt=0,
        description="Non-finite losses or gradients in a row (each step skipped) before training rolls back to "
        "`last.pt` with a lower learning rate.",
    )
    rollback_lr_factor: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="Each rollback multiplies the learning rate by this.",
    )
    max_rollbacks: int = Field(
        3,
        ge=0,
        description="Rollbacks allowed before training gives up with a message.",
    )
    gradient_accumulation_steps: int = Field(
        1,
        gt=0,
        description="Split each update's `batch_size` streams into this many micro-batches and sum their "
        "gradients: a large batch in little memory, with the same result. `batch_size` must be a multiple of it "
        "(times the number of processes under torchrun).",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="`fp32`, or `bf16` or `fp16` autocast (fp16 with loss scaling). bf16 on the CPU runs charlm's "
        "native bf16 loops; a CPU without bf16 units runs fp32 instead, saying so; a GPU without bf16 is an error.",
    )
    compile: bool = Field(
        False,
        description="Run the model through `torch.compile`; where it cannot, training falls back to eager mode "
        "with a warning.",
    )
    threads: int | None = Field(
        None,
        gt=0,
        description="CPU threads for torch's kernels and charlm's native loops. `null`: the machine's physical "
        "cores (under torchrun, what torchrun gives each process).",
    )
    loggers: list[Logger] = Field(
        ["jsonl"],
        description="Where training events go: `metrics.jsonl` in the run dir is always written; `tensorboard` "
        "and `mlflow` (which need the `track` extra, `pip install charlm[track]`) get the same events; see the "
        "Tracking runs guide. A list, or one name: `--set train.loggers=tensorboard`.",
    )
    mlflow_uri: str | None = Field(
        None,
        min_length=1,
        description="The MLflow tracking store or server. `null`: `sqlite:///<run dir>/mlflow.db`.",
    )
    mlflow_experiment: str | None = Field(
        None,
        min_length=1,
        description="The MLflow experiment name. `null`: the run dir's name.",
    )
    logger_timeout: float = Field(
        60.0,
        gt=0,
        # an hour at most: a bound that never fires is no bound
        le=3600,
        description="Seconds one TensorBoard or MLflow call may take before that logger is turned off for the "
        "rest of the run (one warning line; training goes on); also the most the end of the run waits for them.",
    )
    init_from: str | None = Field(
        None,
        description="Start a new run from a trained model's weights: a checkpoint file or a run dir; see the "
        "Fine-tuning guide. `--init-from` sets it.",
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="Parts left untrained: `embedding`, `head`, `rnn.<k>` (layer k), or a parameter name or "
        "prefix; see the Fine-tuning guide.",
    )

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
