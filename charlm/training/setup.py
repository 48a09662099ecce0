"""Everything a run needs before its trainer: the run dir checked, what it starts from (its last.pt or
train.init_from's checkpoint), the corpus, and the model on its backend. Under torchrun rank 0 does
the reading and writing; the other ranks wait for it, then read what it left."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from charlm.config import Config
from charlm.data.corpus import Corpus, load_corpus
from charlm.errors import Interrupted, UserError
from charlm.models.autotune import Choice, Workload, choose
from charlm.models.model import CharLM
from charlm.models.native import cpp_loops
from charlm.models.registry import resolve_backend
from charlm.store.checkpoint import load_checkpoint
from charlm.store.events import Display
from charlm.store.rundir import LAST, prepare_run_dir
from charlm.training import distributed
from charlm.training.announce import ENCODING, WAITING
from charlm.training.context import RunContext
from charlm.training.init_from import Source, given_vocab, load_source, start_facts, transfer_weights
from charlm.training.optim import freeze
from charlm.training.runtime import seed_everything


@dataclass(frozen=True)
class Start:
    """What a run starts from, and the text it trains on."""

    payload: dict | None  # the run's last.pt, when resuming
    source: Source | None  # train.init_from's checkpoint, when fine-tuning
    corpus: Corpus
    notices: tuple[str, ...]  # what preparing the run dir had to say


@dataclass(frozen=True)
class Built:
    model: CharLM
    origin: dict  # what the start event records of train.init_from and train.freeze
    choice: Choice  # how the backend was chosen


@contextmanager
def stage(during: str) -> Iterator[None]:
    """A signal in this block ends the command saying `during` (unless an inner stage said more)."""
    try:
        yield
    except Interrupted as stop:
        stop.during = stop.during or during
        raise


def prepare(ctx: RunContext, display: Display) -> Start:
    """Rank 0 checks the run dir, reads what the run starts from and builds the corpus cache; the
    other ranks wait, then read them."""
    if not ctx.world.main:
        with stage(WAITING):
            _agree_or_fail(False, ctx)
        payload, source = _starting_point(ctx)
        corpus = load_corpus(ctx.cfg.data, vocab=given_vocab(ctx.cfg.data, payload, source))  # rank 0's cache
        return Start(payload, source, corpus, ())
    failed = False
    try:
        _check_source_outside(ctx)
        notices = tuple(prepare_run_dir(ctx.run_dir, ctx.resume, ctx.overwrite))
        payload, source = _starting_point(ctx)
        with stage(ENCODING):
            corpus = _load_corpus(ctx.cfg, payload, source, display)
        return Start(payload, source, corpus, notices)
    except BaseException:  # an error or a signal
        failed = True
        raise
    finally:
        _agree_or_fail(failed, ctx)  # the other ranks must not wait for a rank 0 that gave up


def build_model(ctx: RunContext, corpus: Corpus, source: Source | None) -> Built:
    """The model cfg.model describes, on the backend model.backend names (auto resolved for this
    device and train.precision), initialised from train.seed, which also starts the training RNG
    (dropout): the same weights on every rank and the same run at every rerun. With a `source`
    (train.init_from) its trained weights replace the fresh ones (but for new characters' rows);
    train.freeze's parameters are then frozen."""
    cfg, vocab_size = ctx.cfg, len(corpus.vocab)
    choice = _choose_backend(ctx, vocab_size)
    if choice.backend == "native" and ctx.device.type == "cpu":
        cpp_loops()  # a first run builds the C++ loops here, not on train.max_time's clock
    cfg.model.check_fits(vocab_size)  # the corpus's vocabulary too: refused before anything is allocated
    seed_everything(cfg.train.seed)
    model = CharLM(cfg.model, vocab_size, choice.backend)
    origin: dict = {}
    if source is not None:
        origin["init_from"] = start_facts(source, transfer_weights(model, source.weights, source.vocab, corpus.vocab))
    frozen = freeze(model, cfg.train.freeze)
    if frozen:
        origin["frozen"] = frozen
    return Built(model, origin, choice)


def check_same_freeze(payload: dict, cfg: Config) -> None:
    """The optimiser's state covers the parameters that trained: a resume must freeze the same ones."""
    saved = (payload.get("config") or {}).get("train", {}).get("freeze", [])
    if saved != cfg.train.freeze:
        raise UserError(
            f"cannot resume: train.freeze is {cfg.train.freeze} but the run trained with {saved}; "
            "resume with the run's own config (omit --config) or start a new run"
        )


def _choose_backend(ctx: RunContext, vocab_size: int) -> Choice:
    """model.backend, with auto measured on this run's micro-batch shape. Under torchrun every rank
    must run the same backend without timing each other: the fixed table there."""
    cfg = ctx.cfg
    if ctx.world.enabled:
        backend = resolve_backend(cfg.model.backend, cfg.model.type, ctx.device.type, cfg.train.precision)
        return Choice(backend, "fixed table under torchrun")
    return choose(
        cfg.model.backend, cfg.model, vocab_size, ctx.device, cfg.train.precision, Workload.of_training(cfg.train)
    )


def _check_source_outside(ctx: RunContext) -> None:
    """--overwrite moves the run dir's files aside: train.init_from must not be one of them."""
    source = ctx.cfg.train.init_from
    if source is None or not ctx.overwrite:
        return
    source_path, run_path = Path(source).resolve(), Path(ctx.run_dir).resolve()
    if source_path == run_path or run_path in source_path.parents:
        raise UserError(
            f"--init-from {source} is in {ctx.run_dir}, which --overwrite would move aside; "
            "write the fine-tuned run to another --out"
        )


def _starting_point(ctx: RunContext) -> tuple[dict | None, Source | None]:
    """The run's last.pt when resuming (a resume never re-applies train.init_from), else the checkpoint
    train.init_from names, if any."""
    if ctx.resume:
        return load_checkpoint(ctx.run_dir / LAST), None
    init_from = ctx.cfg.train.init_from
    return None, (load_source(init_from, ctx.cfg) if init_from is not None else None)


def _load_corpus(cfg: Config, payload: dict | None, source: Source | None, display: Display) -> Corpus:
    with display.byte_progress("encoding the corpus") as progress:
        return load_corpus(cfg.data, progress, vocab=given_vocab(cfg.data, payload, source, progress))


def _agree_or_fail(failed: bool, ctx: RunContext) -> None:
    if distributed.any_rank(failed, ctx.world, ctx.device) and not failed:
        raise UserError("rank 0 could not start the run (its error is in its own output)")
