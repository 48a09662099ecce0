"""The engine in a process of its own, driven from the web server's event loop."""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import torch

from charlm.inference.sample import Decoding, make_generator
from charlm.serving.completion import Completion
from charlm.serving.engine import Busy, Engine
from charlm.serving.loading import ModelLoader

READY_TIMEOUT = 300.0  # seconds for the child to load the model (a first C++ build takes minutes)


class EngineDown(Exception):
    """The engine process has ended: no request can be served."""


@dataclass(frozen=True)
class Job:
    """A request as the child needs it (picklable: a seed, not a generator)."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    decoding: Decoding
    seed: int
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_id: int | None = None


class Ticket:
    """What a request handler holds: cancel() frees the request's rows (a client went away)."""

    def __init__(self, engine: EngineProcess, rid: int):
        self.engine, self.rid = engine, rid

    def cancel(self) -> None:
        self.engine.cancel(self.rid)


@dataclass(frozen=True)
class _Child:
    """The started engine process, its two pipes, and the event loop its events arrive on."""

    process: BaseProcess
    commands: Connection  # parent -> child
    events: Connection  # child -> parent
    loop: asyncio.AbstractEventLoop


class EngineProcess:
    """Runs charlm.serving.engine.Engine in a child process that builds its model with `load()`.

    In one process the engine's step loop and the event loop took turns on one interpreter lock:
    under 32 streams a socket send in the event loop waited 0.2 ms for it, and the step loop waited
    as long for every chunk the event loop wrote. Here the step loop runs in a child process
    (spawned, so that it starts with fresh OpenMP threads; it loads the model itself) and sends each
    step's events in one message; the parent reads them on its event loop and hands them to the
    requests.

    Messages, parent -> child: ("submit", rid, Job), ("cancel", rid), ("stop",). Child -> parent:
    ("ready", None) once the model is loaded, then (steps, [(rid, event), ...]) after every step.
    Each direction has its own pipe, used by one thread at each end."""

    def __init__(self, load: ModelLoader, max_requests: int = 64, threads: int | None = None):
        self.load, self.max_requests = load, max_requests
        self.threads = threads or engine_threads()
        self.in_flight = 0
        self.steps = 0
        self._sinks: dict[int, Callable[[dict], None]] = {}
        self._ids = itertools.count()
        self._child: _Child | None = None
        self.down: str | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> EngineProcess:
        """Start the child and wait until its model is loaded; its events then arrive on `loop`."""
        context = multiprocessing.get_context("spawn")
        commands_out, commands_in = context.Pipe(duplex=False)  # (reader, writer)
        events_out, events_in = context.Pipe(duplex=False)
        process = context.Process(
            target=_child_main,
            args=(self.load, commands_out, events_in, self.threads),
            name="charlm-engine",
            daemon=True,
        )
        process.start()
        commands_out.close()
        events_in.close()
        if not events_out.poll(READY_TIMEOUT):
            process.kill()
            raise RuntimeError(f"the engine process did not load the model within {READY_TIMEOUT:.0f} s")
        try:
            events_out.recv()
        except EOFError:
            raise RuntimeError(
                f"the engine process ended while loading the model (exit code {_exit_code(process)})"
            ) from None
        self._child = _Child(process, commands_in, events_out, loop)
        loop.add_reader(events_out.fileno(), self._read)
        return self

    def submit(self, job: Job, sink: Callable[[dict], None]) -> Ticket:
        """Queue a request; its events go to `sink` on the event loop."""
        if self.down is not None:
            raise EngineDown(self.down)
        if self.in_flight >= self.max_requests:
            raise Busy(f"{self.in_flight} requests are in flight, the most this server takes")
        rid = next(self._ids)
        self._sinks[rid] = sink
        self.in_flight += 1
        self._started().commands.send(("submit", rid, job))
        return Ticket(self, rid)

    def cancel(self, rid: int) -> None:
        if rid in self._sinks and self.down is None:
            self._started().commands.send(("cancel", rid))

    def detach(self) -> None:
        """Stop reading events on the event loop (in its thread, before stop() in another)."""
        if self._child is not None and self.down is None:
            self._child.loop.remove_reader(self._child.events.fileno())

    def stop(self, timeout: float = 10.0) -> None:
        """Requests in flight end with finish_reason "shutdown"; the child exits. Call detach() first."""
        child = self._child
        if child is None:
            return
        if self.down is None:
            try:
                child.commands.send(("stop",))
            except OSError:
                pass
            while child.events.poll(timeout):
                if not self._take_one(child.events):
                    break
        child.process.join(timeout)
        if child.process.is_alive():
            child.process.kill()
        self._ended("the server is shutting down")

    def _started(self) -> _Child:
        assert self._child is not None, "start() the engine process first"
        return self._child

    # --- events from the child -----------------------------------------------------------

    def _read(self) -> None:
        child = self._started()
        while child.events.poll():
            if not self._take_one(child.events):
                child.loop.remove_reader(child.events.fileno())
                self._ended(f"the engine process ended (exit code {_exit_code(child.process)})")
                return

    def _take_one(self, events: Connection) -> bool:
        """Deliver one message's events; False at the end of the stream."""
        try:
            steps, step_events = events.recv()
        except (EOFError, OSError):
            return False
        self.steps = steps
        for rid, event in step_events:
            sink = self._sinks.get(rid)
            if sink is None:
                continue
            if event.get("done") or "error" in event:
                del self._sinks[rid]
                self.in_flight -= 1
            sink(event)
        return True

    def _ended(self, reason: str) -> None:
        """The child is gone: every request still waiting gets an error."""
        self.down = self.down or reason
        sinks, self._sinks = self._sinks, {}
        self.in_flight = 0
        for sink in sinks.values():
            sink({"error": reason})


def engine_threads() -> int:
    """Threads for the engine's kernels: every core but one, which the web server and its clients need
    (a kernel split over all cores waits for the one the event loop holds)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, cores - 1)


def _exit_code(process: BaseProcess) -> int | None:
    process.join(5)
    return process.exitcode


def _child_main(load: ModelLoader, commands: Connection, events: Connection, threads: int) -> None:
    """The child: load the model, run the engine, pass commands in and each step's events out."""
    # Ctrl-C reaches the whole process group; the parent decides when this process stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(threads)
    model, vocab, precision_context = load()
    device = next(model.parameters()).device
    outbox: list[tuple[int, dict]] = []
    jobs: dict[int, Completion] = {}

    def flush() -> None:
        if outbox:
            message, outbox[:] = (engine.steps, list(outbox)), []
            events.send(message)

    def sink_for(rid: int) -> Callable[[dict], None]:
        def sink(event: dict) -> None:
            outbox.append((rid, event))
            if event.get("done") or "error" in event:
                jobs.pop(rid, None)

        return sink

    # The parent keeps to max_requests (and counts a request until its last event reaches it).
    engine = Engine(model, vocab, precision_context, max_requests=1 << 30, on_step=flush)
    threading.Thread(
        target=_take_commands, args=(engine, commands, jobs, device, sink_for), name="charlm-commands", daemon=True
    ).start()
    events.send(("ready", None))
    engine.run()  # in this, the main thread (Engine.run says why), until a "stop" command
    flush()
    events.close()


def _take_commands(
    engine: Engine,
    commands: Connection,
    jobs: dict[int, Completion],
    device: torch.device,
    sink_for: Callable[[int], Callable[[dict], None]],
) -> None:
    """The child's second thread: pass the parent's commands to the engine until "stop"."""
    while True:
        try:
            command = commands.recv()
        except EOFError:  # the parent is gone
            command = ("stop",)
        if command[0] == "submit":
            _, rid, job = command
            generator, _ = make_generator(device, job.seed)
            jobs[rid] = completion = Completion(
                prompt_ids=torch.tensor(job.prompt_ids, dtype=torch.long),
                max_tokens=job.max_tokens,
                decoding=job.decoding,
                generator=generator,
                n=job.n,
                stop=job.stop,
                stop_id=job.stop_id,
                sink=sink_for(rid),
            )
            engine.submit(completion)
        elif command[0] == "cancel":
            cancelled = jobs.get(command[1])
            if cancelled is not None:
                cancelled.cancel()
        else:
            engine.stop()
            return
