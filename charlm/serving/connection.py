"""The connection under `charlm serve`'s app: uvicorn's h11 protocol with the limits it lacks (a cap
on connections, deadlines for a request's head and body, a bound on how long a client may stop
reading a response)."""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass

import h11
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from charlm.serving.api import RequestError


@dataclass(frozen=True)
class ConnectionLimits:
    """How many connections a server holds, and how long a client may stall one.

    `client_timeout` bounds, each from its start: reading a request's head, reading its body, and a
    response the client does not read (the send buffer stays full). `keep_alive`: an idle
    connection between requests. `send_buffer`: the kernel's buffer per connection (fixed, so a
    client that stops reading is found after that much, not after megabytes of autotuned buffer)."""

    max_connections: int = 256
    client_timeout: float = 10.0
    keep_alive: int = 5
    send_buffer: int = 64 * 1024


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the guards it lacks. uvicorn times out only idle keep-alive
    connections: a client that sent half a request head or half a body, or stopped reading a
    stream, held its connection (and its request's slot) for ever; and it never caps connections.
    `limits` is set on the subclass that guarded_protocol() makes."""

    limits = ConnectionLimits()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._phase: str | None = None  # "head" or "body": what the running deadline waits for
        self._deadline: asyncio.TimerHandle | None = None
        self._stall: asyncio.TimerHandle | None = None
        self._received = False
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.limits.send_buffer)
        timeout = self.limits.client_timeout
        if len(self.connections) > self.limits.max_connections:
            self.app = _too_many_connections(self.limits.max_connections)  # this connection's one answer
            timeout = min(timeout, 1.0)
        self._arm("head", timeout)

    def data_received(self, data: bytes) -> None:
        self._received = True
        super().data_received(data)
        state = self.conn.their_state
        phase = "head" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
        if phase is None:
            self._disarm()
        elif phase != self._phase:  # a new phase gets a new deadline; more bytes of one do not extend it
            self._arm(phase, self.limits.client_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._stall is not None:
            self._stall.cancel()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall is None:
            self._stall = self.loop.call_later(self.limits.client_timeout, self.transport.abort)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _arm(self, phase: str, timeout: float) -> None:
        self._disarm()
        self._phase, self._deadline = phase, self.loop.call_later(timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._phase = self._deadline = None

    def _too_slow(self) -> None:
        """The client took too long over a request's head or body: 408 (unless it sent nothing at all), close."""
        if self.transport.is_closing():
            return
        if self._received and (self.cycle is None or not self.cycle.response_started):
            what = "request head" if self._phase == "head" else "request body"
            body = json.dumps(
                RequestError(f"the {what} took longer than {self.limits.client_timeout:g} s to arrive", 408).body()
            ).encode()
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
            )
        self.transport.close()  # the handler waiting for the body gets the disconnect before it can answer


def guarded_protocol(limits: ConnectionLimits) -> type:
    """The protocol class for uvicorn.Config(http=...), with these limits."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


def _too_many_connections(cap: int):
    error = RequestError(
        f"this server already holds {cap} connections, its cap (--max-connections); try again shortly",
        503,
        "server_error",
    )

    async def answer(scope, receive, send) -> None:
        await JSONResponse(error.body(), status_code=503, headers={"Connection": "close", "Retry-After": "1"})(
            scope, receive, send
        )

    return answer
