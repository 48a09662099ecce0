"""The engine's events on their way to one request's handler: each choice's text merged as it
arrives, in a queue bounded so that a client that stops reading is dropped."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

QUEUE_CAP = 1 << 18  # characters a request's handler may fall behind the engine before it is dropped


@dataclass
class Chunk:
    """The text one choice gained since the handler last took (pieces joined once, when sent)."""

    index: int
    pieces: list[str] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    tokens: int = 0

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclass(frozen=True)
class End:
    """The request is over: done, or failed with `error`, answered with HTTP `status`."""

    error: str | None = None
    status: int = 503

    @property
    def kind(self) -> str:
        return "invalid_request_error" if self.status < 500 else "server_error"


class EventQueue:
    """Events from the engine to one request's handler on the event loop (EngineProcess delivers
    there, but at shutdown from the thread that stops it: put() moves those onto the loop).

    The engine sends one event per generated character per step; a choice's text events are merged
    as they arrive (appended, joined once when taken), so a handler that takes after many steps
    gets one chunk per choice at a cost linear in the text. Bounded: a handler more than `cap`
    characters behind (its client stopped reading) overflows it; the queue then drops what it
    holds, calls `on_overflow` (which cancels the request) and ends with an error."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cap: int = QUEUE_CAP):
        self.loop, self.loop_thread = loop, threading.get_ident()
        self.cap, self.ready = cap, asyncio.Event()
        self.items: list[Chunk | End] = []
        self.open: dict[int, Chunk] = {}  # each choice's chunk still taking text
        self.held = 0
        self.over = False
        self.on_overflow: Callable[[], None] = lambda: None

    def put(self, event: dict) -> None:
        if threading.get_ident() != self.loop_thread:
            self.loop.call_soon_threadsafe(self.put, event)
            return
        if self.over:
            return
        if "text" not in event:
            self.items.append(End(event.get("error"), event.get("status", 503)))
        elif self._hold(event):
            return
        self.ready.set()

    def _hold(self, event: dict) -> bool:
        """Add a text event to its choice's chunk; True when that overflowed the queue."""
        self.held += len(event["text"])
        if self.held > self.cap:
            self.over, self.items, self.open = (
                True,
                [End(f"the client fell more than {self.cap:,} characters behind; the request was cancelled")],
                {},
            )
            self.ready.set()
            self.on_overflow()
            return True
        chunk = self.open.get(event["index"])
        if chunk is None:
            chunk = self.open[event["index"]] = Chunk(event["index"])
            self.items.append(chunk)
        chunk.pieces.append(event["text"])
        chunk.probs.extend(event.get("probs", ()))
        if "finish_reason" in event:
            chunk.finish_reason, chunk.tokens = event["finish_reason"], event["tokens"]
            del self.open[event["index"]]
        return False

    async def take(self) -> list[Chunk | End]:
        """Everything so far (waiting for something first)."""
        if not self.items:
            await self.ready.wait()
        self.ready.clear()
        taken, self.items, self.open, self.held = self.items, [], {}, 0
        return taken
