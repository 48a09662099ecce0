"""`charlm serve`: the ASGI app (Starlette) over the batched engine.

Routes: GET / (the playground page), GET /health, GET /v1/models, POST /v1/completions
(OpenAI's completion shape; `stream: true` answers with server-sent events). Every error is
JSON: {"error": {"message", "type", "code"}} with the matching HTTP status.

In front of the routes, the Host check (hosts.py); below the app, the connection's limits
(connection.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import time
import traceback
from dataclasses import dataclass, field
from importlib import resources
from typing import AsyncIterator, Callable, Optional, Union

import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from charlm.errors import UserError
from charlm.inference.sample import make_generator, prompt_ids
from charlm.serving.api import (Limits, RequestError, chunk_body, completion_body, completion_id, parse_request)
from charlm.serving.hosts import AllowedHosts, HostGuard
from charlm.serving.worker import Busy, EngineDown, EngineProcess, Ticket


@dataclass
class ServedModel:
    """What the server serves: how it reads text, how it is described, and how the engine process
    builds the model (`load`, picklable: returns model, vocab and the precision context callable)."""

    vocab: object
    text_settings: object
    name: str
    description: dict
    load: Callable


STREAM_INTERVAL = 0.02  # seconds between a stream's chunks (the first goes out at once)
QUEUE_CAP = 1 << 18  # characters a request's handler may fall behind the engine before it is dropped


@dataclass
class Chunk:
    """The text one choice gained since the handler last took (pieces joined once, when sent)."""

    index: int
    pieces: list[str] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    finish_reason: Optional[str] = None
    tokens: int = 0

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclass(frozen=True)
class End:
    """The request is over: done, or failed with `error`, answered with HTTP `status`."""

    error: Optional[str] = None
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
        self.cap, self.items, self.ready = cap, [], asyncio.Event()
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
            self.over, self.items, self.open = True, [End(f"the client fell more than {self.cap:,} characters "
                                                          "behind; the request was cancelled")], {}
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

    async def take(self) -> list[Union[Chunk, End]]:
        """Everything so far (waiting for something first)."""
        if not self.items:
            await self.ready.wait()
        self.ready.clear()
        taken, self.items, self.open, self.held = self.items, [], {}, 0
        return taken


class Server:
    """The app's state: the engine, the limits and the API key."""

    def __init__(self, served: ServedModel, limits: Limits = Limits(), api_key: Optional[str] = None,
                 max_requests: int = 64, max_body_bytes: int = 1 << 20, threads: Optional[int] = None,
                 hosts: Optional[AllowedHosts] = None):
        self.served, self.limits = served, limits
        # compared as the bytes a client sends: the UTF-8 of the key as given
        self.api_key = None if api_key is None else api_key.encode("utf-8")
        self.hosts = hosts or AllowedHosts.parse("127.0.0.1")
        self.max_body_bytes = max_body_bytes
        self.engine = EngineProcess(served.load, max_requests, threads)
        self.started = time.time()

    # --- checks ----------------------------------------------------------------------

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = next((value for name, value in request.scope["headers"] if name == b"authorization"), b"")
        scheme, _, key = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(key.lstrip(b" "), self.api_key):
            raise RequestError("missing or wrong API key: send the header 'Authorization: Bearer <key>'", 401,
                               "authentication_error")

    def check_declared_size(self, request: Request) -> None:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise RequestError(f"the request body is over this server's cap of {self.max_body_bytes:,} bytes", 413)

    @staticmethod
    def check_json(request: Request) -> None:
        """JSON bodies only: a browser sends text/plain or a form cross-site without asking first
        (no CORS preflight), and such a request must not run a generation."""
        media, *params = (part.strip().lower() for part in request.headers.get("content-type", "").split(";"))
        charsets = [p.partition("=")[2].strip('"') for p in params if p.startswith("charset=")]
        if media != "application/json" or any(c not in ("utf-8", "utf8") for c in charsets):
            given = request.headers.get("content-type")
            raise RequestError(f"send the body as JSON with 'Content-Type: application/json' (this request had "
                               f"{repr(given) if given else 'none'})", 415)

    async def read_body(self, request: Request) -> bytes:
        """The body, refused (413) as soon as it passes the cap, whatever Content-Length says."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise RequestError(f"the request body is over this server's cap of {self.max_body_bytes:,} bytes",
                                   413)
            chunks.append(chunk)
        return b"".join(chunks)

    def make_job(self, text: str, request) -> tuple[dict, int, int]:
        """The engine's job for a checked request (worker.Job's fields); its prompt length in units and its seed."""
        served = self.served
        try:
            ids, _ = prompt_ids(served.vocab, text, served.text_settings)
        except UserError as err:
            raise RequestError(str(err)) from None
        _, seed = make_generator(torch.device("cpu"), request.seed)  # the seed (a fresh one when none was given)
        job = dict(prompt_ids=tuple(ids.tolist()), max_tokens=request.max_tokens, decoding=request.decoding,
                   seed=seed, n=request.n, stop=tuple(request.stop or ()))
        return job, int(ids.numel()), seed

    # --- handlers --------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        self.check_key(request)
        self.check_declared_size(request)
        self.check_json(request)
        body = parse_request(await self.read_body(request), self.limits)
        events = EventQueue(asyncio.get_running_loop())
        job, prompt_tokens, seed = self.make_job(body.prompt, body)
        try:
            ticket = self.engine.submit(job, events.put)
        except Busy as err:
            raise RequestError(f"{err}; try again shortly", 429, "rate_limit_error") from None
        except EngineDown as err:
            raise RequestError(f"{err}; restart the server", 503, "server_error") from None
        events.on_overflow = ticket.cancel
        cid = completion_id()
        if body.stream:
            return StreamingResponse(self._stream(cid, ticket, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Charlm-Seed": str(seed)})
        texts, reasons, tokens = await self._collect(request, ticket, body.n, events)
        result = completion_body(cid, self.served.name, texts, reasons, prompt_tokens, tokens)
        result["charlm_seed"] = seed
        return JSONResponse(result)

    async def _collect(self, request: Request, ticket: Ticket, n: int, events: EventQueue):
        """Wait for the whole completion; a client that goes away cancels it at once (its
        disconnect is awaited beside the events, not polled between them)."""
        watcher = asyncio.ensure_future(_disconnected(request))
        watcher.add_done_callback(lambda _: events.put({"error": "the client disconnected"}))
        pieces, reasons, tokens = [[] for _ in range(n)], ["length"] * n, 0
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

    async def _stream(self, cid: str, ticket: Ticket, events: EventQueue) -> AsyncIterator[bytes]:
        """Server-sent events: one per choice per batch of characters ready, then [DONE].
        Starlette cancels this generator when the client disconnects; the finally frees the slot."""
        name = self.served.name
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

    async def models(self, request: Request) -> Response:
        self.check_key(request)
        return JSONResponse({"object": "list", "data": [{
            "id": self.served.name, "object": "model", "created": int(self.started), "owned_by": "charlm",
            "charlm": self.public_facts()}]})

    def public_facts(self) -> dict:
        """What a client needs to know of the model and this server's limits; never the run's config
        (it holds absolute data paths and tracking URIs, credentials included)."""
        description = self.served.description
        facts = {key: description[key] for key in PUBLIC_FACTS if key in description}
        facts.update(max_tokens=self.limits.max_tokens, max_n=self.limits.max_n,
                     max_prompt_chars=self.limits.max_prompt_chars)
        return facts

    async def health(self, request: Request) -> Response:
        """ok (200), or 503 once the engine process has ended (a load balancer should take the server out)."""
        if self.engine.down is not None:
            return JSONResponse({"status": "error", "model": self.served.name, "error": self.engine.down},
                                status_code=503)
        return JSONResponse({"status": "ok", "model": self.served.name, "in_flight": self.engine.in_flight,
                             "steps": self.engine.steps})

    async def playground(self, request: Request) -> Response:
        page = resources.files("charlm.serving").joinpath("playground.html").read_text(encoding="utf-8")
        prompt = self.served.description.get("config", {}).get("sample", {}).get("prompt", "")
        # no other site may frame the page (clickjacking the Generate button with a key in it)
        return HTMLResponse(page.replace("__MODEL__", _html_escape(self.served.name))
                            .replace("__PROMPT__", _html_escape(prompt))
                            .replace("__MAX_TOKENS__", str(self.limits.max_tokens)),
                            headers={"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'"})


PUBLIC_FACTS = ("type", "hidden_size", "num_layers", "vocab_size", "unit", "parameters", "trained_steps",
                "best_val_loss")


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


def _html_escape(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;"))


def create_app(server: Server) -> Starlette:
    """The Starlette app; the engine runs from startup to shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            server.engine.detach()
            await asyncio.get_running_loop().run_in_executor(None, server.engine.stop)

    async def request_error(request: Request, exc: RequestError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: f"no route {request.url.path}; the API is /v1/completions, /v1/models, /health and /",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return JSONResponse(RequestError(message, exc.status_code).body(), status_code=exc.status_code)

    async def disconnected(request: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=499)

    async def bug(request: Request, exc: Exception) -> Response:
        # A bug, not the client's mistake: the traceback goes to the server's stderr, JSON to the client.
        traceback.print_exception(exc)
        return JSONResponse(RequestError(f"internal error: {type(exc).__name__}", 500, "server_error").body(),
                            status_code=500)

    routes = [Route("/", server.playground), Route("/health", server.health), Route("/v1/models", server.models),
              Route("/v1/completions", server.completions, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(HostGuard, hosts=server.hosts)],
                    exception_handlers={RequestError: request_error, HTTPException: http_error,
                                        ClientDisconnect: disconnected, Exception: bug})
    app.state.server = server
    return app
