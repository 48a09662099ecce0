"""The request side of `charlm serve`: the OpenAI-shaped completion request, checked, and the
response bodies. No web framework here: app.py maps HTTP onto these."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from charlm.inference.sample import Decoding


class RequestError(Exception):
    """A bad request: its message goes back to the client with `status`."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.kind = message, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "code": self.status}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_tokens: int = 2000
    max_n: int = 16
    max_prompt_chars: int = 20_000


class CompletionRequest(BaseModel):
    """POST /v1/completions: OpenAI's completion fields charlm uses, plus top_k."""

    model_config = ConfigDict(extra="ignore", strict=True)  # strict: "0.5" is not a temperature

    prompt: str | list[str] = ""
    max_tokens: int = Field(16, ge=1)
    # Any value in [0, 100] is served: a tiny one (1e-300, 5e-324) is greedy decoding, the limit as the
    # temperature goes to 0 (sampling_probs scales so that nothing overflows), not a 400; the engine
    # still fails alone a request whose row cannot be drawn from (a model's NaN scores).
    temperature: float = Field(1.0, ge=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: None | str | list[str] = None
    stream: bool = False
    model: str | None = None  # accepted and ignored: one model per server

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _int_is_a_number(cls, value):
        # strict mode refuses 1 for a float field; JSON has one number type, so accept it
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("give one prompt (a string, or a list holding one string)")
            return value[0]
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if value is None:
            return []
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 4 or any(not s or len(s) > 100 for s in stops):
            raise ValueError("stop: up to 4 non-empty strings of at most 100 characters")
        return stops

    @property
    def text(self) -> str:
        """The prompt (_one_prompt has made a list of one string that string)."""
        assert isinstance(self.prompt, str), "a checked request's prompt is a string"
        return self.prompt

    @property
    def decoding(self) -> Decoding:
        return Decoding(self.temperature, self.top_k, self.top_p if self.top_p < 1 else None)


def parse_request(body: bytes, limits: Limits) -> CompletionRequest:
    """The request in `body` (JSON), checked against the schema and the server's limits."""
    try:
        request = CompletionRequest.model_validate_json(body or b"{}")
    except ValidationError as err:
        raise RequestError(_first_problem(err)) from None
    if request.max_tokens > limits.max_tokens:
        raise RequestError(f"max_tokens {request.max_tokens} is above this server's cap of {limits.max_tokens}")
    if request.n > limits.max_n:
        raise RequestError(f"n {request.n} is above this server's cap of {limits.max_n}")
    if len(request.prompt) > limits.max_prompt_chars:
        raise RequestError(
            f"the prompt has {len(request.prompt):,} characters, above this server's cap of {limits.max_prompt_chars:,}"
        )
    return request


def _first_problem(err: ValidationError) -> str:
    problem = err.errors()[0]
    if problem["type"] == "json_invalid":
        return f"the body is not valid JSON: {problem.get('ctx', {}).get('error', problem['msg'])}"
    where = ".".join(str(part) for part in problem["loc"]) or "body"
    return f"{where}: {problem['msg']}"


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def completion_body(
    cid: str, model: str, texts: list[str], reasons: list[str], prompt_tokens: int, completion_tokens: int
) -> dict:
    """The non-streamed response: one choice per row."""
    return {
        "id": cid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
            for i, (text, reason) in enumerate(zip(texts, reasons))
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def chunk_body(
    cid: str, model: str, index: int, text: str, reason: str | None, probs: list[float] | None = None
) -> dict:
    """One server-sent event of a streamed response (charlm adds each character's probability)."""
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
    if probs is not None:
        choice["charlm_probs"] = [round(p, 5) for p in probs]
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": [choice]}
