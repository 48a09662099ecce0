"""`charlm serve`'s web app (Starlette): its routes, their handlers, and errors answered as JSON."""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from charlm.serving.api import Limits, RequestError, completion_body, completion_id
from charlm.serving.engine import Busy
from charlm.serving.events import EventQueue
from charlm.serving.hosts import AllowedHosts, HostGuard
from charlm.serving.intake import Intake, engine_job
from charlm.serving.loading import ServedModel
from charlm.serving.streaming import collect, stream
from charlm.serving.worker import EngineDown, EngineProcess

# what /v1/models tells of the model (never the run's config: it holds absolute data paths and
# tracking URIs, credentials included)
PUBLIC_FACTS = (
    "type",
    "hidden_size",
    "num_layers",
    "vocab_size",
    "unit",
    "parameters",
    "trained_steps",
    "best_val_loss",
)


class Server:
    """The app's state (the engine, the limits and the API key) and its route handlers.

    Routes: GET / (the playground page), GET /health, GET /v1/models, POST /v1/completions
    (OpenAI's completion shape; `stream: true` answers with server-sent events). Every error is
    JSON: {"error": {"message", "type", "code"}} with the matching HTTP status. In front of the
    routes, the Host check (hosts.py); below the app, the connection's limits (connection.py)."""

    def __init__(
        self,
        served: ServedModel,
        limits: Limits | None = None,
        api_key: str | None = None,
        max_requests: int = 64,
        max_body_bytes: int = 1 << 20,
        threads: int | None = None,
        hosts: AllowedHosts | None = None,
    ):
        self.served, self.limits = served, limits or Limits()
        self.intake = Intake(None if api_key is None else api_key.encode("utf-8"), max_body_bytes, self.limits)
        self.hosts = hosts or AllowedHosts.parse("127.0.0.1")
        self.engine = EngineProcess(served.load, max_requests, threads)
        self.started = time.time()

    async def completions(self, request: Request) -> Response:
        body = await self.intake.completion_request(request)
        events = EventQueue(asyncio.get_running_loop())
        job, prompt_tokens = engine_job(self.served, body)
        try:
            ticket = self.engine.submit(job, events.put)
        except Busy as err:
            raise RequestError(f"{err}; try again shortly", 429, "rate_limit_error") from None
        except EngineDown as err:
            raise RequestError(f"{err}; restart the server", 503, "server_error") from None
        events.on_overflow = ticket.cancel
        cid = completion_id()
        if body.stream:
            return StreamingResponse(
                stream(cid, self.served.name, ticket, events),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Charlm-Seed": str(job.seed)},
            )
        texts, reasons, tokens = await collect(request, ticket, body.n, events)
        result = completion_body(cid, self.served.name, texts, reasons, prompt_tokens, tokens)
        result["charlm_seed"] = job.seed
        return JSONResponse(result)

    async def models(self, request: Request) -> Response:
        self.intake.check_key(request)
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.served.name,
                        "object": "model",
                        "created": int(self.started),
                        "owned_by": "charlm",
                        "charlm": self.public_facts(),
                    }
                ],
            }
        )

    def public_facts(self) -> dict:
        """What a client needs to know of the model and this server's limits."""
        description = self.served.description
        facts = {key: description[key] for key in PUBLIC_FACTS if key in description}
        facts.update(
            max_tokens=self.limits.max_tokens, max_n=self.limits.max_n, max_prompt_chars=self.limits.max_prompt_chars
        )
        return facts

    async def health(self, request: Request) -> Response:
        """ok (200), or 503 once the engine process has ended (a load balancer should take the server out)."""
        if self.engine.down is not None:
            return JSONResponse(
                {"status": "error", "model": self.served.name, "error": self.engine.down}, status_code=503
            )
        return JSONResponse(
            {"status": "ok", "model": self.served.name, "in_flight": self.engine.in_flight, "steps": self.engine.steps}
        )

    async def playground(self, request: Request) -> Response:
        page = resources.files("charlm.serving").joinpath("playground.html").read_text(encoding="utf-8")
        prompt = self.served.description.get("config", {}).get("sample", {}).get("prompt", "")
        # no other site may frame the page (clickjacking the Generate button with a key in it)
        return HTMLResponse(
            page.replace("__MODEL__", _html_escape(self.served.name))
            .replace("__PROMPT__", _html_escape(prompt))
            .replace("__MAX_TOKENS__", str(self.limits.max_tokens)),
            headers={"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'"},
        )


def _html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def create_app(server: Server) -> Starlette:
    """The Starlette app; the engine runs from startup to shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        server.engine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            server.engine.detach()
            await asyncio.get_running_loop().run_in_executor(None, server.engine.stop)

    async def request_error(request: Request, exc: RequestError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {
            404: f"no route {request.url.path}; the API is /v1/completions, /v1/models, /health and /",
            405: f"{request.method} is not allowed on {request.url.path}",
        }.get(exc.status_code, exc.detail)
        return JSONResponse(RequestError(message, exc.status_code).body(), status_code=exc.status_code)

    async def disconnected(request: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=499)

    async def bug(request: Request, exc: Exception) -> Response:
        # A bug, not the client's mistake: the traceback goes to the server's stderr, JSON to the client.
        traceback.print_exception(exc)
        return JSONResponse(
            RequestError(f"internal error: {type(exc).__name__}", 500, "server_error").body(), status_code=500
        )

    # Starlette calls each handler with an exception of its key's class (its own type says any Exception).
    handlers: dict[Any, Callable[..., Awaitable[Response]]] = {
        RequestError: request_error,
        HTTPException: http_error,
        ClientDisconnect: disconnected,
        Exception: bug,
    }
    routes = [
        Route("/", server.playground),
        Route("/health", server.health),
        Route("/v1/models", server.models),
        Route("/v1/completions", server.completions, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(HostGuard, hosts=server.hosts)],
        exception_handlers=handlers,
    )
    app.state.server = server
    return app
