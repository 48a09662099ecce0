"""One training run from start to end: run dir, data, device, process group, model, trainer, report.
Under torchrun rank 0 alone touches the run dir (lock, config, metrics, checkpoints) and builds
the corpus cache; the other ranks wait for it, then everyone trains in lockstep."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

from charlm import hardware
from charlm.training import distributed
from charlm.store.checkpoint import check_resumable, load_checkpoint
from charlm.training.init_from import (Source, describe_start, given_vocab, load_source, start_facts,
                                       transfer_weights, vocab_dims)
from charlm.training.optim import freeze
from charlm.store.rundir import LAST
from charlm.config import Config
from charlm.data.corpus import Corpus, load_corpus
from charlm.training.distributed import World
from charlm.errors import Interrupted, UserError
from charlm.models.model import CharLM, count_parameters
from charlm.models.native import cpp_loops
from charlm.models.autotune import Choice, Workload, choose, mode as autotune_mode
from charlm.models.registry import describe_backend, resolve_backend
from charlm.training.loggers import check_loggers, open_loggers
from charlm.store.events import Event
from charlm.store.metrics import NoMetrics
from charlm.store.rundir import RunLock, prepare_run_dir, write_config
from charlm.training.runtime import (allow_tf32, use_threads, check_precision, describe_device, process_device_note,
                                     resolve_device, seed_everything, usable_precision)
from charlm.training.signals import StopRequests
from charlm.training.trainer import Trainer, TrainOutcome


STARTING = "while starting the run; nothing was trained"
ENCODING = "while reading and encoding the corpus; nothing was trained"
WAITING = "while waiting for rank 0 to read and encode the corpus; nothing was trained"
FINISHED = "after training had finished; every file of the run is written"


def train(cfg: Config, run_dir: Path, resume: bool = False, overwrite: bool = False, *,
          display) -> TrainOutcome:
    """Train a model as `cfg` says, writing the run into `run_dir` (locked while training).

    `display` shows the run (charlm.report.progress.TrainingDisplay, or anything with its
    methods): the run is handed it, so training imports nothing from report."""
    with _stage(STARTING):
        check_loggers(cfg.train)  # a missing library of the track extra: say so before anything is written
        hardware.isa_cap(), autotune_mode()  # and a CHARLM_MAX_ISA / CHARLM_AUTO it does not know
        world = distributed.world_from_env()
        device = resolve_device(cfg.train.device, world.local_rank if world.enabled else None)
        use_threads(cfg.train.threads, world)
        check_precision(device, cfg.train.precision)
        cfg, precision_note = _usable_precision(cfg, device)
        allow_tf32(device, cfg.train.precision)
        distributed.start(world, device)
    device_note = process_device_note(cfg.train.device, device) if world.enabled else None
    note = "; ".join(n for n in (device_note, precision_note) if n) or None
    try:
        with distributed.peers_may_stop(world):
            if not world.main:
                display = display.silenced()
            if world.main:
                with RunLock(run_dir) as lock:
                    notices = lock.notices + ([note] if note else [])
                    outcome = _train_locked(cfg, run_dir, resume, overwrite, display, world, device, notices)
            else:
                outcome = _train_locked(cfg, run_dir, resume, overwrite, display, world, device, [])
            # A rank that tears its gloo connections down while another still finishes up can abort
            # the other one; leave together.
            with _stage(FINISHED):
                distributed.barrier(world)
        return outcome
    finally:
        # Not cut short by a signal (torchrun sends SIGTERM to the others once one rank exits
        # with an error code): a half-destroyed process group aborts the process at exit.
        with StopRequests():
            distributed.stop(world)


def _usable_precision(cfg: Config, device: torch.device) -> tuple[Config, Optional[str]]:
    """The config with the precision this device can run at speed (bf16 on a CPU without bf16 units
    runs fp32: config.yaml then records fp32, what ran), and the notice saying so."""
    precision, notice = usable_precision(device, cfg.train.precision)
    if notice is None:
        return cfg, None
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": precision})}), notice


@contextmanager
def _stage(during: str) -> Iterator[None]:
    """A signal in this block ends the command saying `during` (unless an inner stage said more)."""
    try:
        yield
    except Interrupted as stop:
        stop.during = stop.during or during
        raise


def _train_locked(cfg, run_dir, resume, overwrite, display, world: World, device, notices) -> TrainOutcome:
    with _stage(STARTING):
        trainer, metrics = _start(cfg, run_dir, resume, overwrite, display, world, device, notices)
    try:
        with display:
            return trainer.run(metrics)
    except Interrupted as stop:  # only from the final evaluation: the loop itself stops between steps
        stop.during = stop.during or _final_evaluation_note(trainer, run_dir)
        raise
    finally:
        metrics.close()


def _start(cfg, run_dir, resume, overwrite, display, world: World, device, notices):
    """Everything before the first step: the corpus, the trainer (restored, or saved once: from
    scratch or from train.init_from's weights), the logs."""
    (payload, source), corpus, notices = _prepare(cfg, run_dir, resume, overwrite, display, world, device, notices)
    for notice in notices:
        display.message(notice)
    if source is not None:  # config.yaml names the very file it started from (a run dir's best.pt)
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"init_from": str(source.path)})})
    model, origin, choice = _build_model(cfg, corpus, device, source, world)
    trainer = Trainer(cfg, run_dir, corpus, model, device, display, world)
    if payload is not None:
        check_resumable(payload, cfg, corpus)
        _check_same_freeze(payload, cfg)
        trainer.restore(payload)
        if trainer.budget.reached(trainer.pos.step, trainer.pos.elapsed):
            raise UserError(f"the run in {run_dir} already reached its budget (step {trainer.pos.step}); "
                            "raise train.max_steps or train.max_time with --set to train further")
    else:
        trainer.save()  # from here on the run dir always holds a loadable last.pt
    metrics = open_loggers(cfg, run_dir, trainer.pos.step, payload is not None, display.message) if world.main \
        else NoMetrics()
    if world.main:
        write_config(run_dir, cfg.to_dict())
        _announce(display, trainer, corpus, device, payload is not None, world, choice)
        _announce_origin(display, origin, cfg.train.freeze, trainer.model, len(corpus.vocab))
    metrics.log(Event("start", trainer.pos.step, dict(
        resumed=payload is not None, device=describe_device(device), backend=trainer.model.backend,
        num_parameters=count_parameters(trainer.model), vocab_size=len(corpus.vocab),
        train_chars=corpus.train_ids.numel(), val_chars=corpus.val_ids.numel(), world_size=world.size, **origin)))
    return trainer, metrics


def _build_model(cfg: Config, corpus: Corpus, device: torch.device, source: Optional[Source] = None,
                 world: Optional[World] = None) -> tuple[CharLM, dict, Choice]:
    """The model cfg.model describes, on the backend model.backend names (auto resolved for this
    device and train.precision), initialised from train.seed, which also starts the training RNG
    (dropout): the same weights on every rank and the same run at every rerun. With a `source`
    (train.init_from) its trained weights replace the fresh ones (but for new characters' rows);
    train.freeze's parameters are then frozen. Also returns what the start event records of both, and
    how the backend was chosen."""
    choice = _choose_backend(cfg, len(corpus.vocab), device, world)
    if choice.backend == "native" and device.type == "cpu":
        cpp_loops()  # a first run builds the C++ loops here, not on train.max_time's clock
    cfg.model.check_fits(len(corpus.vocab))  # the corpus's vocabulary too: refused before anything is allocated
    seed_everything(cfg.train.seed)
    model = CharLM(cfg.model, len(corpus.vocab), choice.backend)
    origin = {}
    if source is not None:
        origin["init_from"] = start_facts(source, transfer_weights(model, source.weights, source.vocab, corpus.vocab))
    frozen = freeze(model, cfg.train.freeze)
    if frozen:
        origin["frozen"] = frozen
    return model, origin, choice


def _choose_backend(cfg: Config, vocab_size: int, device: torch.device, world: Optional[World]) -> Choice:
    """model.backend, with auto measured on this run's micro-batch shape. Under torchrun every rank
    must run the same backend without timing each other: the fixed table there."""
    if world is not None and world.enabled:
        backend = resolve_backend(cfg.model.backend, cfg.model.type, device.type, cfg.train.precision)
        return Choice(backend, "fixed table under torchrun")
    return choose(cfg.model.backend, cfg.model, vocab_size, device, cfg.train.precision,
                  Workload.of_training(cfg.train))


def _check_same_freeze(payload: dict, cfg: Config) -> None:
    """The optimiser's state covers the parameters that trained: a resume must freeze the same ones."""
    saved = (payload.get("config") or {}).get("train", {}).get("freeze", [])
    if saved != cfg.train.freeze:
        raise UserError(f"cannot resume: train.freeze is {cfg.train.freeze} but the run trained with {saved}; "
                        "resume with the run's own config (omit --config) or start a new run")


def _announce_origin(display, origin: dict, names: list[str], model: CharLM, vocab_size: int) -> None:
    if "init_from" in origin:
        display.message(describe_start(origin["init_from"], vocab_size))
    if "frozen" in origin:
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        display.message(f"frozen (train.freeze: {', '.join(names)}): {frozen:,} of {count_parameters(model):,} "
                        "parameters stay as they are")
        untrained = [name for name in origin["frozen"] if name in vocab_dims(model)]
        new = len(origin.get("init_from", {}).get("new_tokens", []))
        if new and untrained:
            display.message(f"warning: {', '.join(untrained)} frozen: the {new} new vocabulary entries' rows there "
                            "keep their initial values")


def _prepare(cfg, run_dir, resume, overwrite, display, world: World, device, notices) -> tuple[tuple, Corpus, list]:
    """Rank 0 checks the run dir, reads what the run starts from (its last.pt to resume, train.init_from's
    checkpoint to fine-tune) and builds the corpus cache; the other ranks wait, then read them."""
    if not world.main:
        with _stage(WAITING):
            _agree_or_fail(False, world, device)
        start = _starting_point(cfg, run_dir, resume)
        return start, load_corpus(cfg.data, vocab=given_vocab(cfg.data, *start)), notices  # from rank 0's cache
    failed = False
    try:
        _check_source_outside(cfg, run_dir, overwrite)
        notices = notices + prepare_run_dir(run_dir, resume, overwrite)
        start = _starting_point(cfg, run_dir, resume)
        with _stage(ENCODING):
            return start, _load_corpus(cfg, start, display), notices
    except BaseException:  # an error or a signal
        failed = True
        raise
    finally:
        _agree_or_fail(failed, world, device)  # the other ranks must not wait for a rank 0 that gave up


def _check_source_outside(cfg: Config, run_dir: Path, overwrite: bool) -> None:
    """--overwrite moves the run dir's files aside: train.init_from must not be one of them."""
    source = cfg.train.init_from
    if source is None or not overwrite:
        return
    source_path, run_path = Path(source).resolve(), Path(run_dir).resolve()
    if source_path == run_path or run_path in source_path.parents:
        raise UserError(f"--init-from {source} is in {run_dir}, which --overwrite would move aside; "
                        "write the fine-tuned run to another --out")


def _starting_point(cfg: Config, run_dir: Path, resume: bool) -> tuple[Optional[dict], Optional[Source]]:
    """The run's last.pt when resuming (a resume never re-applies train.init_from), else the checkpoint
    train.init_from names, if any."""
    if resume:
        return load_checkpoint(run_dir / LAST), None
    return None, (load_source(cfg.train.init_from, cfg) if cfg.train.init_from is not None else None)


def _load_corpus(cfg: Config, start: tuple, display) -> Corpus:
    with display.byte_progress("encoding the corpus") as progress:
        corpus = load_corpus(cfg.data, progress, vocab=given_vocab(cfg.data, *start, progress))
    for notice in corpus.notices:
        display.message(notice)
    return corpus


def _final_evaluation_note(trainer: Trainer, run_dir: Path) -> str:
    budget = "train.max_steps" if trainer.cfg.train.max_steps is not None else "train.max_time"
    return (f"during the final evaluation; training had finished: {run_dir / LAST} holds the trained model "
            f"(step {trainer.pos.step}). To train it further, resume with a larger budget: "
            f"charlm train --resume --out {run_dir} --set {budget}=...")


def _agree_or_fail(failed: bool, world: World, device: torch.device) -> None:
    if distributed.any_rank(failed, world, device) and not failed:
        raise UserError("rank 0 could not start the run (its error is in its own output)")


def _precision(precision: str, device: torch.device, backend: str) -> list[str]:
    if precision == "fp32":
        return []
    if precision == "bf16" and device.type == "cuda" and backend == "fused":  # see charlm.models.fused
        return ["precision bf16 (the cuDNN recurrence in float32 with TF32: cuDNN's autocast would run it in fp16)"]
    return [f"precision {precision}"]


def _announce(display, trainer: Trainer, corpus: Corpus, device: torch.device, resumed: bool,
              world: World, choice: Choice) -> None:
    cfg = trainer.cfg
    where = describe_device(device) + (f", {world.size} processes (torchrun)" if world.enabled else "")
    if device.type == "cpu":
        threads = torch.get_num_threads()
        where += f" ({hardware.cpu_model()}, {threads} thread{'s' if threads > 1 else ''})"
    display.message(f"device: {where}")
    skipped = f" ({corpus.val_oov_chars:,} val characters not in it)" if corpus.val_oov_chars else ""
    display.message(f"data: {corpus.train_ids.numel():,} train / {corpus.val_ids.numel():,} val units, "
                    f"vocabulary {len(corpus.vocab)}{skipped}")
    backend = describe_backend(cfg.model.backend, trainer.model.backend)
    display.message(f"model: {cfg.model.type} {cfg.model.num_layers}x{cfg.model.hidden_size} (backend {backend}), "
                    f"{count_parameters(trainer.model):,} parameters; "
                    f"{trainer.batches.windows_per_epoch} steps per epoch")
    if cfg.model.backend == "auto":
        display.message(choice.describe())
    extras = _precision(cfg.train.precision, device, trainer.model.backend)
    if cfg.train.gradient_accumulation_steps > 1:
        extras.append(f"{cfg.train.gradient_accumulation_steps} accumulation steps per update")
    if cfg.model.weight_dropout:
        extras.append(f"weight dropout {cfg.model.weight_dropout:g}")
    if cfg.train.random_offsets:
        extras.append("random window offsets per epoch")
    if cfg.train.ema_decay:
        extras.append(f"validating an average of the weights (ema_decay {cfg.train.ema_decay:g})")
    if world.enabled:
        extras.append(f"global batch {cfg.train.batch_size} = {world.size} x {trainer.local_batch} streams")
    if extras:
        display.message("training: " + ", ".join(extras))
    if resumed:
        display.message(f"resuming from step {trainer.pos.step} (epoch {trainer.pos.epoch})")
