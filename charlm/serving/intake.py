"""A completion request read off HTTP: its API key, its body's size and type, the body checked
against the schema, and the engine job it becomes."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

import torch
from starlette.requests import Request

from charlm.errors import UserError
from charlm.inference.sample import make_generator, prompt_ids
from charlm.serving.api import CompletionRequest, Limits, RequestError, parse_request
from charlm.serving.loading import ServedModel
from charlm.serving.worker import Job


@dataclass(frozen=True)
class Intake:
    """What a request must pass before it reaches the engine."""

    api_key: bytes | None  # compared as the bytes a client sends: the UTF-8 of the key as given
    max_body_bytes: int
    limits: Limits

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = next((value for name, value in request.scope["headers"] if name == b"authorization"), b"")
        scheme, _, key = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(key.lstrip(b" "), self.api_key):
            raise RequestError(
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'", 401, "authentication_error"
            )

    async def completion_request(self, request: Request) -> CompletionRequest:
        """The request's body as a checked completion request (its key, size and type checked first)."""
        self.check_key(request)
        self._check_declared_size(request)
        _check_json(request)
        return parse_request(await self._read_body(request), self.limits)

    def _check_declared_size(self, request: Request) -> None:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise RequestError(f"the request body is over this server's cap of {self.max_body_bytes:,} bytes", 413)

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused (413) as soon as it passes the cap, whatever Content-Length says."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise RequestError(f"the request body is over this server's cap of {self.max_body_bytes:,} bytes", 413)
            chunks.append(chunk)
        return b"".join(chunks)


def _check_json(request: Request) -> None:
    """JSON bodies only: a browser sends text/plain or a form cross-site without asking first
    (no CORS preflight), and such a request must not run a generation."""
    media, *params = (part.strip().lower() for part in request.headers.get("content-type", "").split(";"))
    charsets = [p.partition("=")[2].strip('"') for p in params if p.startswith("charset=")]
    if media != "application/json" or any(c not in ("utf-8", "utf8") for c in charsets):
        given = request.headers.get("content-type")
        raise RequestError(
            f"send the body as JSON with 'Content-Type: application/json' (this request had "
            f"{repr(given) if given else 'none'})",
            415,
        )


def engine_job(served: ServedModel, request: CompletionRequest) -> tuple[Job, int]:
    """The engine's job for a checked request, and its prompt's length in units. The job carries
    the request's seed, a fresh one when none was given."""
    try:
        ids, _ = prompt_ids(served.vocab, request.text, served.text_settings)
    except UserError as err:
        raise RequestError(str(err)) from None
    _, seed = make_generator(torch.device("cpu"), request.seed)
    job = Job(
        prompt_ids=tuple(ids.tolist()),
        max_tokens=request.max_tokens,
        decoding=request.decoding,
        seed=seed,
        n=request.n,
        stop=tuple(request.stop or ()),
    )
    return job, int(ids.numel())
