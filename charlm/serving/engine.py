"""Batched generation for many clients: one recurrent step per character for every request in flight.

A request (`Completion`) has its prompt read first (it warms up the request's own state): in
chunks of PROMPT_CHUNK characters, one chunk's worth per loop iteration between the batch's
steps, so a long prompt delays the requests already streaming by one chunk per step instead
of stalling them for the whole prompt. Then its rows join the batch and leave it when done. Each request draws from its own
generator with its own decoding settings, so a request alone gives exactly what `charlm sample`
gives with the same seed and settings (generate() in charlm.inference.sample runs the same steps);
in a batch only float rounding of the batched matmuls can differ.

The engine runs in one thread (start(): a background one; run(): the caller's); results go to
each request's `sink`. `charlm serve` runs it in the main thread of a process of its own
(worker.py), whose sinks gather each step's events into one message.
"""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from charlm.inference.sample import PROMPT_CHUNK, Decoding, chosen_probs, pick, read_prompt_chunk, uniforms


class Busy(Exception):
    """The engine already holds as many requests as it may."""


@dataclass
class Completion:
    """One request: prompt ids [P], n rows, up to max_tokens units each."""

    prompt_ids: torch.Tensor
    max_tokens: int
    decoding: Decoding
    generator: torch.Generator
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_id: Optional[int] = None  # a unit id that ends a row (the document end marker)
    sink: Callable[[dict], None] = lambda event: None  # where the request's events go
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Stop generating for this request (a client went away): its rows leave at the next step."""
        self.cancelled.set()


class _Row:
    """One row of a request in the batch: its decoder, the text it holds back, and whether it is done.

    Text is held back while it could be the start of a stop sequence. Each character keeps the
    probability the model gave it (for a character made of several bytes, their product)."""

    def __init__(self, job: Completion, index: int, decoder):
        self.job, self.index, self.decoder = job, index, decoder
        self.pending = ""  # text not sent yet
        self.probs: list[float] = []  # one per character of `pending`
        self.unit_prob = 1.0  # of the units the decoder holds (an unfinished UTF-8 character)
        self.produced = 0
        self.finish: Optional[str] = None

    def add(self, unit: int, prob: float) -> Optional[dict]:
        """Take one generated unit; the event to send now (None: nothing to send yet)."""
        if self.finish is not None:  # done, waiting for the request's other rows
            return None
        self.produced += 1
        if unit == self.job.stop_id:
            return self._end("stop")
        self.unit_prob *= prob
        self._append(self.decoder.feed(unit))
        cut = [self.pending.find(s) for s in self.job.stop if s and s in self.pending]
        if cut:
            self._truncate(min(cut))
            return self._end("stop")
        if self.produced >= self.job.max_tokens:
            self._append(self.decoder.flush())
            return self._end("length")
        return self._release(len(self.pending) - self._held_back())

    def _append(self, text: str) -> None:
        if text:
            self.pending += text
            self.probs += [self.unit_prob] + [1.0] * (len(text) - 1)
            self.unit_prob = 1.0

    def _truncate(self, length: int) -> None:
        self.pending, self.probs = self.pending[:length], self.probs[:length]

    def _release(self, count: int) -> Optional[dict]:
        if count <= 0:
            return None
        event = {"index": self.index, "text": self.pending[:count], "probs": self.probs[:count]}
        self.pending, self.probs = self.pending[count:], self.probs[count:]
        return event

    def _held_back(self) -> int:
        """How many trailing characters could begin a stop sequence (they wait for the next ones)."""
        longest = 0
        for s in self.job.stop:
            for k in range(min(len(s) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def _end(self, reason: str) -> dict:
        self.finish = reason
        event = {"index": self.index, "text": self.pending, "probs": self.probs, "finish_reason": reason,
                 "tokens": self.produced}
        self.pending, self.probs = "", []
        return event


class Engine:
    """Serves Completions from `model` in one batched loop; at most `max_requests` in flight."""

    def __init__(self, model: torch.nn.Module, vocab, precision_context: Callable = None, max_requests: int = 64,
                 on_step: Optional[Callable[[], None]] = None):
        self.model, self.vocab, self.max_requests = model.eval(), vocab, max_requests
        self._on_step = on_step or (lambda: None)  # called in the loop after each step's events were sent
        self.device = next(model.parameters()).device
        self._precision = precision_context
        self._pending: list[Completion] = []
        self._reading: list[_Reading] = []  # prompts being read, in arrival order (engine thread only)
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.in_flight = 0
        self.steps = 0

    # --- control ---------------------------------------------------------------------

    def start(self) -> "Engine":
        """Run the loop in a background thread."""
        self._thread = threading.Thread(target=self._run, name="charlm-engine", daemon=True)
        self._thread.start()
        return self

    def run(self) -> None:
        """Run the loop in this thread until stop() is called from another. The engine process runs it
        in its main thread: a kernel's OpenMP threads belong to the thread that starts them, and a
        second set beside the main thread's makes libgomp stop spinning (more threads than cores),
        which tripled the time of a step loop in a thread on the development machine."""
        self._run()

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop: requests still in flight end with finish_reason "shutdown"."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Completion) -> Completion:
        """Queue a request; it joins the batch at the next step. Raises Busy when full."""
        with self._lock:
            if self._stopping:
                raise Busy("the server is shutting down")
            if self.in_flight >= self.max_requests:
                raise Busy(f"{self.in_flight} requests are in flight, the most this server takes")
            self.in_flight += 1
            self._pending.append(job)
            self._lock.notify_all()
        return job

    # --- the loop --------------------------------------------------------------------

    def _run(self) -> None:
        rows: list[_Row] = []
        logits: Optional[torch.Tensor] = None  # [N, V]
        state: Optional[tuple] = None  # each [L, N, H]
        with torch.no_grad(), (self._precision() if self._precision else _null()):
            while True:
                with self._lock:
                    while not self._pending and not rows and not self._reading and not self._stopping:
                        self._lock.wait()
                    if self._stopping:
                        break
                    joining, self._pending = self._pending, []
                try:
                    joining = self._admit(joining)
                    self._reading.extend(_prompt_groups(joining, self.device))
                    logits, state = self._read_prompts(rows, logits, state)
                    if rows:
                        logits, state, rows = self._step(rows, logits, state)
                except Exception as err:  # noqa: BLE001 - a bug: fail the requests in flight, keep serving
                    traceback.print_exception(err)
                    self._fail(rows, [*joining, *self._reading_jobs()], f"internal error: {type(err).__name__}")
                    logits, state, rows, self._reading = None, None, [], []
                self._on_step()
        for row in rows:
            if row.finish is None:
                row.finish = "shutdown"
                row.job.sink({"index": row.index, "text": row.pending, "probs": row.probs,
                              "finish_reason": "shutdown", "tokens": row.produced})
        self._release_finished(rows, [])
        self._fail([], [*self._pending, *self._reading_jobs()], "the server is shutting down")
        self._on_step()

    def _fail(self, rows: list, jobs: list, message: str, status: int = 503) -> None:
        """End these requests with an error event and free their slots. `status` is the HTTP status
        the server answers with: 503 for the server's own state (shutting down, a failed step: try
        again later), 400 for a request it cannot serve, 500 for a model whose scores are not finite
        (retrying cannot help)."""
        failed = {id(job): job for job in [*(row.job for row in rows), *jobs]}
        with self._lock:
            self.in_flight -= len(failed)
        for job in failed.values():
            job.sink({"error": message, "status": status})

    def _admit(self, jobs: list) -> list:
        """The requests the engine can serve; each other one ends with its own error event. The web
        server checks requests before they get here; this keeps one that slipped by (an empty
        prompt, n = 0, a top_k of 0) from failing the batch or holding its slot forever."""
        admitted = []
        for job in jobs:
            refusal = _refusal(job, len(self.vocab))
            if refusal is None:
                admitted.append(job)
            else:
                self._fail([], [job], refusal, status=400)
        return admitted

    def _read_prompts(self, rows: list, logits, state):
        """Read the next chunk of the waiting prompts, oldest first, about PROMPT_CHUNK positions in
        all (at least one chunk); the requests whose prompt is now read append their rows."""
        parts_logits = [] if logits is None else [logits]
        parts_state = [] if state is None else [state]
        budget, still = PROMPT_CHUNK, []
        for group in self._reading:
            if budget <= 0:
                still.append(group)
                continue
            if all(job.cancelled.is_set() for job in group.jobs):
                self._release(group.jobs)
                continue
            start = group.read
            last, group.state, group.read = read_prompt_chunk(self.model, group.ids, start, group.state)
            budget -= group.read - start
            if group.read < group.ids.shape[1]:
                still.append(group)
                continue
            rows_of = torch.repeat_interleave(torch.arange(len(group.jobs)), torch.tensor([j.n for j in group.jobs]))
            parts_logits.append(last.float()[rows_of.to(last.device)])
            parts_state.append(tuple(s[:, rows_of.to(s.device)] for s in group.state))
            for job in group.jobs:
                rows.extend(_Row(job, i, self.vocab.stream_decoder()) for i in range(job.n))
        self._reading = still
        if not parts_logits:
            return None, None
        return torch.cat(parts_logits), tuple(torch.cat(parts, dim=1) for parts in zip(*parts_state))

    def _reading_jobs(self) -> list:
        return [job for group in self._reading for job in group.jobs]

    def _release(self, jobs: list) -> None:
        """Free the slots of requests cancelled before their prompt was read."""
        with self._lock:
            self.in_flight -= len(jobs)
        for job in jobs:
            job.sink({"done": True})

    def _step(self, rows: list, logits: torch.Tensor, state: tuple):
        """Draw one unit for every row, send what is ready, drop finished rows, run one batched step."""
        units = self._draw(rows, logits)  # every unit in range, whatever the scores
        probs = chosen_probs(logits, units).tolist()  # NaN for a row whose scores are not finite
        failed = self._fail_undrawable(rows, probs)
        ended = bool(failed)
        for row, unit, prob in zip(rows, units.tolist(), probs):
            if id(row.job) in failed:
                continue
            if row.job.cancelled.is_set():
                row.finish = row.finish or "cancelled"
                ended = True
                continue
            event = row.add(unit, prob)
            if event is not None:
                row.job.sink(event)
                ended = ended or row.finish is not None
        if ended:
            # A request's rows stay until all of them are done (so its generator draws as in
            # generate(), whose samples run until the last one ends); a cancelled one leaves at once.
            unfinished = {id(row.job) for row in rows if row.finish is None}
            keep = [i for i, row in enumerate(rows) if id(row.job) in unfinished]
            self._release_finished(rows, keep, failed)
            if not keep:
                return None, None, []
            if len(keep) < len(rows):
                rows = [rows[i] for i in keep]
                index = torch.tensor(keep, device=logits.device)
                units, state = units[keep], tuple(s.index_select(1, index) for s in state)
        out, state = self.model(units.to(self.device)[:, None], state)  # [N, 1, V]
        self.steps += 1
        return out[:, -1].float(), state, rows

    def _fail_undrawable(self, rows: list, probs: list[float]) -> set:
        """End each request with a row that could not be drawn from (its scores are NaN or infinite)
        with its own error event; the ids of those requests. Their rows leave the batch at this step
        and the other requests go on: rows never mix in the model, so one row's NaN stays its own.
        A row already done is not looked at: its draws are thrown away."""
        if not any(p != p for p in probs):  # no NaN: every step but a faulty one
            return set()
        failed: dict[int, tuple[Completion, int]] = {}
        for row, prob in zip(rows, probs):
            if prob != prob and row.finish is None and not row.job.cancelled.is_set():
                failed.setdefault(id(row.job), (row.job, row.index))
        for job, index in failed.values():
            for row in rows:
                if row.job is job:
                    row.finish = "error"
            self._fail([], [job], f"the model's scores for row {index} of this request are not finite "
                                  "(NaN or infinity), so nothing can be drawn from them", status=500)
        return set(failed)

    def _draw(self, rows: list, logits: torch.Tensor) -> torch.Tensor:
        """One unit per row [N] (on the CPU), as pick_next would draw it for each request alone: each
        request takes its uniform numbers from its own generator, then the rows of all requests with
        the same settings are drawn in one call (one multinomial call per request cost more than the
        batched model step at 32 requests). Every unit is in range, whatever the scores."""
        parts: dict[Decoding, tuple[list[int], list[torch.Tensor]]] = {}
        start = 0
        for job, count in _groups(rows):
            if not job.cancelled.is_set():
                index, draws = parts.setdefault(job.decoding, ([], []))
                index.extend(range(start, start + count))
                if job.decoding.temperature > 0:
                    draws.append(uniforms(count, job.generator, logits.device))
            start += count
        units = torch.zeros(len(rows), dtype=torch.long)
        for decoding, (index, draws) in parts.items():
            every_row = len(index) == len(rows)
            chosen = logits if every_row else logits[torch.tensor(index, device=logits.device)]
            picked = pick(chosen, decoding, torch.cat(draws) if draws else None)
            if every_row:
                return picked.cpu()
            units[torch.tensor(index)] = picked.cpu()
        return units

    def _release_finished(self, rows: list, keep: list, failed: frozenset = frozenset()) -> None:
        """Send "done" for the requests of `rows` that are neither kept nor already `failed` (ids), and free their slots."""
        kept = {id(rows[i].job) for i in keep} | set(failed)
        done = {id(row.job): row.job for row in rows if id(row.job) not in kept}
        if done:
            with self._lock:
                self.in_flight -= len(done)
            for job in done.values():
                job.sink({"done": True})


@dataclass
class _Reading:
    """Requests with prompts of one length, read together: ids [G, P], the state so far."""

    jobs: list
    ids: torch.Tensor
    read: int = 0
    state: Optional[tuple] = None


def _prompt_groups(jobs: list, device) -> list[_Reading]:
    """New requests grouped by prompt length (a burst of clients asking with the same prompt costs
    one pass), in arrival order of each length's first request."""
    by_length: dict[int, list[Completion]] = {}
    for job in jobs:
        by_length.setdefault(int(job.prompt_ids.numel()), []).append(job)
    return [_Reading(group, torch.stack([job.prompt_ids for job in group]).to(device).long())
            for group in by_length.values()]


def _refusal(job: Completion, vocab_size: int) -> Optional[str]:
    """Why the engine cannot serve `job`, naming the field (None: it can)."""
    problem = job.decoding.problem()
    if problem is not None:
        return f"{problem.field} {problem.reason}"
    if job.n < 1:
        return f"n must be at least 1, not {job.n}"
    if job.max_tokens < 1:
        return f"max_tokens must be at least 1, not {job.max_tokens}"
    ids = job.prompt_ids
    if ids.numel() == 0:
        return "prompt: the engine needs at least one unit of prompt to start from"
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        return f"prompt: unit ids must be in [0, {vocab_size}), the model's vocabulary"
    return None


def _groups(rows: list) -> list[tuple[Completion, int]]:
    """Consecutive rows of the same request: (request, row count), in batch order."""
    groups: list[tuple[Completion, int]] = []
    for row in rows:
        if groups and groups[-1][0] is row.job:
            groups[-1] = (row.job, groups[-1][1] + 1)
        else:
            groups.append((row.job, 1))
    return groups


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
