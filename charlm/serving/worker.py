"""The engine in a process of its own, driven from the web server's event loop.

In one process the engine's step loop and the event loop took turns on one interpreter lock:
under 32 streams a socket send in the event loop waited 0.2 ms for it, and the step loop waited
as long for every chunk the event loop wrote. Here the step loop runs in a child process (spawned,
so that it starts with fresh OpenMP threads; it loads the model itself) and sends each step's
events in one message; the parent reads them on its event loop and hands them to the requests.

Messages, parent -> child: ("submit", Job), ("cancel", rid), ("stop",). Child -> parent:
("ready", None) once the model is loaded, then (steps, [(rid, event), ...]) after every step.
Each direction has its own pipe, used by one thread at each end.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import threading
from dataclasses import dataclass
from typing import Callable, Optional

from charlm.inference.sample import Decoding
from charlm.serving.engine import Busy

__all__ = ["Busy", "EngineDown", "EngineProcess", "Job", "Ticket"]

READY_TIMEOUT = 300.0  # seconds for the child to load the model (a first C++ build takes minutes)


class EngineDown(Exception):
    """The engine process has ended: no request can be served."""


@dataclass(frozen=True)
class Job:
    """A request as the child needs it (picklable: a seed, not a generator)."""

    rid: int
    prompt_ids: tuple[int, ...]
    max_tokens: int
    decoding: Decoding
    seed: int
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_id: Optional[int] = None


class Ticket:
    """What a request handler holds: cancel() frees the request's rows (a client went away)."""

    def __init__(self, engine: "EngineProcess", rid: int):
        self.engine, self.rid = engine, rid

    def cancel(self) -> None:
        self.engine.cancel(self.rid)


class EngineProcess:
    """Runs charlm.serving.engine.Engine in a child process that builds its model with `load()`
    (a picklable callable returning model, vocab and the precision context callable, or None)."""

    def __init__(self, load: Callable, max_requests: int = 64, threads: Optional[int] = None):
        self.load, self.max_requests = load, max_requests
        self.threads = threads or engine_threads()
        self.in_flight = 0
        self.steps = 0
        self._sinks: dict[int, Callable[[dict], None]] = {}
        self._ids = itertools.count()
        self._process = None
        self._commands = self._events = None
        self._loop = None
        self.down: Optional[str] = None

    def start(self, loop) -> "EngineProcess":
        """Start the child and wait until its model is loaded; its events then arrive on `loop`."""
        context = multiprocessing.get_context("spawn")
        commands_out, commands_in = context.Pipe(duplex=False)  # (reader, writer)
        events_out, events_in = context.Pipe(duplex=False)
        self._process = context.Process(target=_child, args=(self.load, commands_out, events_in, self.threads),
                                        name="charlm-engine", daemon=True)
        self._process.start()
        commands_out.close()
        events_in.close()
        self._commands, self._events = commands_in, events_out
        if not self._events.poll(READY_TIMEOUT):
            self._process.kill()
            raise RuntimeError(f"the engine process did not load the model within {READY_TIMEOUT:.0f} s")
        try:
            self._events.recv()
        except EOFError:
            raise RuntimeError(f"the engine process ended while loading the model (exit code "
                               f"{self._process.join(5) or self._process.exitcode})") from None
        self._loop = loop
        loop.add_reader(self._events.fileno(), self._read)
        return self

    def submit(self, job_fields: dict, sink: Callable[[dict], None]) -> Ticket:
        """Queue a request (Job's fields but rid); its events go to `sink` on the event loop."""
        if self.down is not None:
            raise EngineDown(self.down)
        if self.in_flight >= self.max_requests:
            raise Busy(f"{self.in_flight} requests are in flight, the most this server takes")
        rid = next(self._ids)
        self._sinks[rid] = sink
        self.in_flight += 1
        self._commands.send(("submit", Job(rid=rid, **job_fields)))
        return Ticket(self, rid)

    def cancel(self, rid: int) -> None:
        if rid in self._sinks and self.down is None:
            self._commands.send(("cancel", rid))

    def detach(self) -> None:
        """Stop reading events on the event loop (in its thread, before stop() in another)."""
        if self._loop is not None and self.down is None:
            self._loop.remove_reader(self._events.fileno())

    def stop(self, timeout: float = 10.0) -> None:
        """Requests in flight end with finish_reason "shutdown"; the child exits. Call detach() first."""
        if self._process is None:
            return
        if self.down is None:
            try:
                self._commands.send(("stop",))
            except OSError:
                pass
            while self._events.poll(timeout):
                if not self._take_one():
                    break
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
        self._ended("the server is shutting down")

    # --- events from the child -----------------------------------------------------------

    def _read(self) -> None:
        while self._events.poll():
            if not self._take_one():
                self._loop.remove_reader(self._events.fileno())
                self._ended(f"the engine process ended (exit code {self._process.join(5) or self._process.exitcode})")
                return

    def _take_one(self) -> bool:
        """Deliver one message's events; False at the end of the stream."""
        try:
            steps, events = self._events.recv()
        except (EOFError, OSError):
            return False
        self.steps = steps
        for rid, event in events:
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


def _child(load: Callable, commands, events, threads: int) -> None:
    """The child: load the model, run the engine, pass commands in and each step's events out."""
    # Ctrl-C reaches the whole process group; the parent decides when this process stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import torch  # noqa: PLC0415 - only the child needs torch

    torch.set_num_threads(threads)

    from charlm.serving.engine import Engine  # noqa: PLC0415

    model, vocab, precision_context = load()
    device = next(model.parameters()).device
    outbox: list = []
    jobs: dict = {}  # rid -> Completion

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
    threading.Thread(target=_take_commands, args=(engine, commands, jobs, device, sink_for), name="charlm-commands",
                     daemon=True).start()
    events.send(("ready", None))
    engine.run()  # in this, the main thread (Engine.run says why), until a "stop" command
    flush()
    events.close()


def _take_commands(engine, commands, jobs: dict, device, sink_for: Callable) -> None:
    """The child's second thread: pass the parent's commands to the engine until "stop"."""
    import torch  # noqa: PLC0415

    from charlm.inference.sample import make_generator  # noqa: PLC0415
    from charlm.serving.engine import Completion  # noqa: PLC0415

    while True:
        try:
            command = commands.recv()
        except EOFError:  # the parent is gone
            command = ("stop",)
        if command[0] == "submit":
            job: Job = command[1]
            generator, _ = make_generator(device, job.seed)
            jobs[job.rid] = completion = Completion(
                prompt_ids=torch.tensor(job.prompt_ids, dtype=torch.long), max_tokens=job.max_tokens,
                decoding=job.decoding, generator=generator, n=job.n, stop=job.stop, stop_id=job.stop_id,
                sink=sink_for(job.rid))
            engine.submit(completion)
        elif command[0] == "cancel":
            job = jobs.get(command[1])
            if job is not None:
                job.cancel()
        else:
            engine.stop()
            return
