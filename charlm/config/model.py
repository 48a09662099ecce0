"""The model section: the cell type and backend choices (from the registry), the size bounds, and
the check that a model fits a machine before anything is allocated."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, TypeAlias, get_args

from pydantic import Field, ValidationInfo, field_validator, model_validator

import charlm.models.registry as registry
from charlm.config.base import ConfigError, Section

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


class ModelConfig(Section):
    """The network: the recurrent cell and its size, dropout, how characters enter it, and the backend that runs
    it. A model with its vocabulary must stay under 2^33 (8.6 billion) parameters, more than any machine could
    train."""

    type: CellType = Field(
        "lstm",
        description="The recurrent cell: `rnn` (tanh), `lstm`, `gru` or `mingru`; see the Models and backends page.",
    )
    hidden_size: int = Field(
        256,
        gt=0,
        le=MAX_WIDTH,
        description="Hidden units per layer (H).",
    )
    num_layers: int = Field(
        2,
        gt=0,
        le=MAX_LAYERS,
        description="Stacked recurrent layers (L).",
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout between the recurrent layers and before the output layer, while training.",
    )
    weight_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="DropConnect on the recurrent weights (`weight_hh`) while training: one random mask per layer "
        "per window, shared by all its steps. `mingru` has no recurrent weights, so it needs `0`.",
    )
    locked_dropout: bool = Field(
        False,
        description="`true`: every dropout mask is drawn once per window and used at all its steps (variational "
        "dropout); `false`: a fresh mask at every step.",
    )
    input_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on the model's input: the embedded (or one-hot) characters.",
    )
    embedding_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Drops whole characters: zeroes random rows of the embedding table at each forward call while "
        "training. Needs `input: embedding`.",
    )
    input: Literal["onehot", "embedding"] = Field(
        "embedding",
        description="How a character enters the network: `onehot` (the input is the one-hot vector) or "
        "`embedding` (a learned table of `embedding_dim` numbers per character).",
    )
    embedding_dim: int = Field(
        64,
        gt=0,
        le=MAX_WIDTH,
        description="Size of each character's embedding (E). Ignored with `input: onehot`.",
    )
    # Kept as written in config.yaml; the run resolves auto (registry.resolve_backend).
    backend: Backend = Field(
        registry.AUTO,
        description="What runs the recurrence: `auto` (the fastest correct backend for the device and precision, "
        "measured on the run's shapes), `native` (charlm's own step loops), `fused` (torch's kernels: cuDNN on a "
        "GPU) or `reference` (each cell's equations in a Python loop). All give the same weights, so a model "
        "trained with one runs with another; `mingru` has no `fused`. See the Models and backends page.",
    )

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
