"""A request's events turned into its answer: gathered whole for one JSON body, or sent on as
server-sent events while the engine makes them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from starlette.requests import ClientDisconnect, Request

from charlm.serving.api import RequestError, chunk_body
from charlm.serving.events import End, EventQueue
from charlm.serving.worker import Ticket

STREAM_INTERVAL = 0.02  # seconds between a stream's chunks (the first goes out at once)


async def collect(request: Request, ticket: Ticket, n: int, events: EventQueue) -> tuple[list[str], list[str], int]:
    """Wait for the whole completion: each choice's text, its finish reason, and the units made in
    all. A client that goes away cancels it at once (its disconnect is awaited beside the events,
    not polled between them)."""
    watcher = asyncio.ensure_future(_disconnected(request))
    watcher.add_done_callback(lambda _: events.put({"error": "the client disconnected"}))
    pieces: list[list[str]] = [[] for _ in range(n)]
    reasons, tokens = ["length"] * n, 0
    try:
        while True:
            for item in await events.take():
                if isinstance(item, End):
                    if watcher.done():
                        ticket.cancel()
                        raise ClientDisconnect()
                    if item.error is not None:
                        raise RequestError(item.error, item.status, item.kind)
                    return ["".join(p) for p in pieces], reasons, tokens
                pieces[item.index].extend(item.pieces)
                if item.finish_reason is not None:
                    reasons[item.index] = item.finish_reason
                    tokens += item.tokens
    finally:
        watcher.cancel()


async def stream(cid: str, name: str, ticket: Ticket, events: EventQueue) -> AsyncIterator[bytes]:
    """Server-sent events: one per choice per batch of characters ready, then [DONE].
    Starlette cancels this generator when the client disconnects; the finally frees the slot."""
    try:
        while True:
            for item in await events.take():
                if isinstance(item, End) and item.error is not None:
                    yield _sse({"error": {"message": item.error, "type": item.kind, "code": item.status}})
                    return
                if isinstance(item, End):
                    yield b"data: [DONE]\n\n"
                    return
                yield _sse(chunk_body(cid, name, item.index, item.text, item.finish_reason, item.probs))
            # Let characters gather for a moment: one event per character per request would
            # cost more in JSON and HTTP framing than the batched step that made them.
            await asyncio.sleep(STREAM_INTERVAL)
    finally:
        ticket.cancel()  # a no-op for a finished job; frees the batch rows of an abandoned one


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()
