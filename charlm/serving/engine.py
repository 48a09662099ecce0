"""The batched generation engine: one recurrent step per character for every request in flight,
in one loop that admits requests, reads their prompts, draws and steps (torch only)."""

from __future__ import annotations

import contextlib
import threading
import traceback
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from charlm.data.vocab import Vocab
from charlm.inference.sample import PROMPT_CHUNK, chosen_probs, read_prompt_chunk
from charlm.serving.completion import Completion, refusal
from charlm.serving.draw import draw_units
from charlm.serving.rows import Row

State = tuple[torch.Tensor, ...]  # the model's recurrent state, each [L, N, H]


class Busy(Exception):
    """The engine already holds as many requests as it may."""


class Engine:
    """Serves Completions from `model` in one batched loop; at most `max_requests` in flight.

    A request has its prompt read first (it warms up the request's own state): in chunks of
    PROMPT_CHUNK characters, one chunk's worth per loop iteration between the batch's steps, so a
    long prompt delays the requests already streaming by one chunk per step instead of stalling
    them for the whole prompt. Then its rows join the batch and leave it when done. Each request
    draws from its own generator with its own decoding settings, so a request alone gives exactly
    what `charlm sample` gives with the same seed and settings (generate() in charlm.inference.sample
    runs the same steps); in a batch only float rounding of the batched matmuls can differ.

    The loop runs in one thread (start(): a background one; run(): the caller's); results go to
    each request's `sink`. `charlm serve` runs it in the main thread of a process of its own
    (worker.py), whose sinks gather each step's events into one message."""

    def __init__(
        self,
        model: torch.nn.Module,
        vocab: Vocab,
        precision_context: Callable[[], contextlib.AbstractContextManager] | None = None,
        max_requests: int = 64,
        on_step: Callable[[], None] | None = None,
    ):
        self.model, self.vocab, self.max_requests = model.eval(), vocab, max_requests
        self._on_step = on_step or (lambda: None)  # called in the loop after each step's events were sent
        self.device = next(model.parameters()).device
        self._precision = precision_context
        self._pending: list[Completion] = []
        self._reading: list[_Reading] = []  # prompts being read, in arrival order (engine thread only)
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.in_flight = 0
        self.steps = 0

    # --- control ---------------------------------------------------------------------

    def start(self) -> Engine:
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
        rows: list[Row] = []
        logits: torch.Tensor | None = None  # [N, V]
        state: State | None = None
        with torch.no_grad(), self._precision() if self._precision else contextlib.nullcontext():
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
                    if logits is not None and state is not None:  # the batch has rows exactly when it has logits
                        logits, state, rows = self._step(rows, logits, state)
                except Exception as err:  # a bug: fail the requests in flight, keep serving
                    traceback.print_exception(err)
                    self._fail(rows, [*joining, *self._reading_jobs()], f"internal error: {type(err).__name__}")
                    logits, state, rows, self._reading = None, None, [], []
                self._on_step()
        for row in rows:
            if row.finish is None:
                row.job.sink(row.end("shutdown"))
        self._release_finished(rows, [])
        self._fail([], [*self._pending, *self._reading_jobs()], "the server is shutting down")
        self._on_step()

    def _fail(self, rows: list[Row], jobs: list[Completion], message: str, status: int = 503) -> None:
        """End these requests with an error event and free their slots. `status` is the HTTP status
        the server answers with: 503 for the server's own state (shutting down, a failed step: try
        again later), 400 for a request it cannot serve, 500 for a model whose scores are not finite
        (retrying cannot help)."""
        failed = {id(job): job for job in [*(row.job for row in rows), *jobs]}
        with self._lock:
            self.in_flight -= len(failed)
        for job in failed.values():
            job.sink({"error": message, "status": status})

    def _admit(self, jobs: list[Completion]) -> list[Completion]:
        """The requests the engine can serve; each other one ends with its own error event."""
        admitted = []
        for job in jobs:
            problem = refusal(job, len(self.vocab))
            if problem is None:
                admitted.append(job)
            else:
                self._fail([], [job], problem, status=400)
        return admitted

    def _read_prompts(
        self, rows: list[Row], logits: torch.Tensor | None, state: State | None
    ) -> tuple[torch.Tensor | None, State | None]:
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
                rows.extend(Row(job, i, self.vocab.stream_decoder()) for i in range(job.n))
        self._reading = still
        if not parts_logits:
            return None, None
        return torch.cat(parts_logits), tuple(torch.cat(parts, dim=1) for parts in zip(*parts_state))

    def _reading_jobs(self) -> list[Completion]:
        return [job for group in self._reading for job in group.jobs]

    def _release(self, jobs: list[Completion]) -> None:
        """Free the slots of requests cancelled before their prompt was read."""
        with self._lock:
            self.in_flight -= len(jobs)
        for job in jobs:
            job.sink({"done": True})

    def _step(
        self, rows: list[Row], logits: torch.Tensor, state: State
    ) -> tuple[torch.Tensor | None, State | None, list[Row]]:
        """Draw one unit for every row, send what is ready, drop finished rows, run one batched step."""
        units = draw_units(rows, logits)  # every unit in range, whatever the scores
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

    def _fail_undrawable(self, rows: list[Row], probs: list[float]) -> set[int]:
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
            self._fail(
                [],
                [job],
                f"the model's scores for row {index} of this request are not finite "
                "(NaN or infinity), so nothing can be drawn from them",
                status=500,
            )
        return set(failed)

    def _release_finished(self, rows: list[Row], keep: list[int], failed: Collection[int] = ()) -> None:
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

    jobs: list[Completion]
    ids: torch.Tensor
    read: int = 0
    state: State | None = None


def _prompt_groups(jobs: list[Completion], device: torch.device) -> list[_Reading]:
    """New requests grouped by prompt length (a burst of clients asking with the same prompt costs
    one pass), in arrival order of each length's first request."""
    by_length: dict[int, list[Completion]] = {}
    for job in jobs:
        by_length.setdefault(int(job.prompt_ids.numel()), []).append(job)
    return [
        _Reading(group, torch.stack([job.prompt_ids for job in group]).to(device).long())
        for group in by_length.values()
    ]
