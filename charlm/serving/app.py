"""`charlm serve`: the ASGI app (Starlette) over the batched engine.

Routes: GET / (the playground page), GET /health, GET /v1/models, POST /v1/completions
(OpenAI's completion shape; `stream: true` answers with server-sent events). Every error is
JSON: {"error": {"message", "type", "code"}} with the matching HTTP status.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import time
import traceback
from dataclasses import dataclass
from importlib import resources
from typing import AsyncIterator, Callable, Optional

import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from charlm.errors import UserError
from charlm.inference.sample import make_generator, prompt_ids
from charlm.serving.api import (Limits, RequestError, chunk_body, completion_body, completion_id, parse_request)
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


class EventQueue:
    """Events from the engine to one request's handler on the event loop (put from any thread).

    The engine sends one event per generated character; waking the loop for each would cost
    more than the step at 64 requests, so a wake-up is scheduled only when none is pending
    and the handler takes everything that arrived since."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items, self.ready, self.wake_pending = loop, collections.deque(), asyncio.Event(), False

    def put(self, event: dict) -> None:
        self.items.append(event)
        if not self.wake_pending:
            self.wake_pending = True
            self.loop.call_soon_threadsafe(self.ready.set)

    async def take(self, timeout: Optional[float] = None) -> list[dict]:
        """Every event so far (waiting for one first); [] when `timeout` passes without one."""
        if not self.items:
            try:
                await asyncio.wait_for(self.ready.wait(), timeout)
            except asyncio.TimeoutError:
                return []
        self.ready.clear()
        self.wake_pending = False  # before draining: an event put from now on schedules a new wake-up
        taken = []
        while self.items:
            taken.append(self.items.popleft())
        return taken


class Server:
    """The app's state: the engine, the limits and the API key."""

    def __init__(self, served: ServedModel, limits: Limits = Limits(), api_key: Optional[str] = None,
                 max_requests: int = 64, max_body_bytes: int = 1 << 20, threads: Optional[int] = None):
        self.served, self.limits, self.api_key = served, limits, api_key
        self.max_body_bytes = max_body_bytes
        self.engine = EngineProcess(served.load, max_requests, threads)
        self.started = time.time()

    # --- checks ----------------------------------------------------------------------

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise RequestError("missing or wrong API key: send the header 'Authorization: Bearer <key>'", 401,
                               "authentication_error")

    async def read_body(self, request: Request) -> bytes:
        """The body, refused (413) as soon as it passes the cap, whatever Content-Length says."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise RequestError(f"the request body is over this server's cap of {self.max_body_bytes:,} bytes", 413)
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
        body = parse_request(await self.read_body(request), self.limits)
        events = EventQueue(asyncio.get_running_loop())
        job, prompt_tokens, seed = self.make_job(body.prompt, body)
        try:
            ticket = self.engine.submit(job, events.put)
        except Busy as err:
            raise RequestError(f"{err}; try again shortly", 429, "rate_limit_error") from None
        except EngineDown as err:
            raise RequestError(f"{err}; restart the server", 503, "server_error") from None
        cid = completion_id()
        if body.stream:
            return StreamingResponse(self._stream(cid, ticket, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Charlm-Seed": str(seed)})
        texts, reasons, tokens = await self._collect(request, ticket, body.n, events)
        result = completion_body(cid, self.served.name, texts, reasons, prompt_tokens, tokens)
        result["charlm_seed"] = seed
        return JSONResponse(result)

    async def _collect(self, request: Request, ticket: Ticket, n: int, events: EventQueue):
        """Wait for the whole completion; a client that goes away cancels it."""
        texts, reasons, tokens = [""] * n, ["length"] * n, 0
        while True:
            batch = await events.take(timeout=0.5)
            if not batch and await request.is_disconnected():
                ticket.cancel()
                raise ClientDisconnect()
            for event in batch:
                if "error" in event:
                    raise RequestError(event["error"], 503, "server_error")
                if event.get("done"):
                    return texts, reasons, tokens
                texts[event["index"]] += event["text"]
                if "finish_reason" in event:
                    reasons[event["index"]] = event["finish_reason"]
                    tokens += event["tokens"]

    async def _stream(self, cid: str, ticket: Ticket, events: EventQueue) -> AsyncIterator[bytes]:
        """Server-sent events: one per choice per batch of characters ready, then [DONE].
        Starlette cancels this generator when the client disconnects; the finally frees the slot."""
        name = self.served.name
        try:
            while True:
                for event in _merged(await events.take()):
                    if "error" in event:
                        yield _sse({"error": {"message": event["error"], "type": "server_error", "code": 503}})
                        return
                    if event.get("done"):
                        yield b"data: [DONE]\n\n"
                        return
                    yield _sse(chunk_body(cid, name, event["index"], event["text"], event.get("finish_reason"),
                                          event.get("probs")))
                # Let characters gather for a moment: one event per character per request would
                # cost more in JSON and HTTP framing than the batched step that made them.
                await asyncio.sleep(STREAM_INTERVAL)
        finally:
            ticket.cancel()  # a no-op for a finished job; frees the batch rows of an abandoned one

    async def models(self, request: Request) -> Response:
        self.check_key(request)
        return JSONResponse({"object": "list", "data": [{
            "id": self.served.name, "object": "model", "created": int(self.started), "owned_by": "charlm",
            "charlm": self.served.description}]})

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
        return HTMLResponse(page.replace("__MODEL__", _html_escape(self.served.name))
                            .replace("__PROMPT__", _html_escape(prompt))
                            .replace("__MAX_TOKENS__", str(self.limits.max_tokens)))


def _merged(batch: list[dict]) -> list[dict]:
    """Consecutive text events of one choice as one event (fewer, larger SSE chunks under load)."""
    merged: list[dict] = []
    for event in batch:
        last = merged[-1] if merged else None
        if (last is not None and "text" in event and "text" in last and last["index"] == event["index"]
                and "finish_reason" not in last):
            last["text"] += event["text"]
            last["probs"] = last.get("probs", []) + event.get("probs", [])
            if "finish_reason" in event:
                last["finish_reason"] = event["finish_reason"]
        else:
            merged.append(dict(event))
    return merged


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
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={RequestError: request_error, HTTPException: http_error,
                                        ClientDisconnect: disconnected, Exception: bug})
    app.state.server = server
    return app
