"""Who may ask `charlm serve`: the names its Host header may give. A web page can rebind its own
name to 127.0.0.1 and so reach a loopback server from any browser (DNS rebinding); a server that
answers only to its own names cannot be reached that way."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from starlette.responses import JSONResponse

from charlm.errors import UserError
from charlm.serving.api import RequestError

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?")


@dataclass(frozen=True)
class AllowedHosts:
    """The names a request's Host header may give (any port): this machine's loopback names, the
    --host served on, and --allowed-hosts ("*" for any, "*.example.org" for its subdomains)."""

    names: frozenset[str]
    suffixes: tuple[str, ...] = ()
    anything: bool = False

    @classmethod
    def parse(cls, host: str, allowed: str | None = None) -> AllowedHosts:
        names, suffixes, anything = set(LOOPBACK_NAMES), [], False
        bound = _entry_name(host)
        if bound not in (None, "0.0.0.0", "::"):  # a wildcard address is no name a client should send
            names.add(bound)
        for entry in (e.strip().lower() for e in (allowed or "").split(",") if e.strip()):
            if entry == "*":
                anything = True
            elif entry.startswith("*.") and _NAME.fullmatch(entry[2:]):
                suffixes.append(entry[1:])
            elif (name := _entry_name(entry)) is not None:
                names.add(name)
            else:
                raise UserError(
                    f"--allowed-hosts: {entry!r} is not a host name; give names such as "
                    "'example.org', '*.example.org', '10.0.0.5' or '*' (any), separated by commas"
                )
        return cls(frozenset(names), tuple(suffixes), anything)

    def allows(self, header: bytes | None) -> bool:
        name = None if header is None else _host_name(header)
        if name is None:
            return False
        return self.anything or name in self.names or name.endswith(self.suffixes)


def _entry_name(entry: str) -> str | None:
    """A name as given on the command line: a host name, an address (IPv6 with or without brackets)."""
    try:
        return str(ipaddress.ip_address(entry.strip("[]")))
    except ValueError:
        return _host_name(entry.encode("utf-8"))


def _host_name(value: bytes) -> str | None:
    """The name of a Host header ("name", "name:port", "[v6]:port"), lower case; None when malformed."""
    try:
        text = value.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return None
    if text.startswith("["):
        inside, closed, port = text[1:].partition("]")
        if not closed or (port and not (port.startswith(":") and port[1:].isdigit())):
            return None
        try:
            return str(ipaddress.IPv6Address(inside))
        except ValueError:
            return None
    name, colon, port = text.partition(":")
    if colon and not port.isdigit():
        return None
    name = name[:-1] if name.endswith(".") else name  # "localhost." is localhost
    return name if _NAME.fullmatch(name) else None


class HostGuard:
    """ASGI middleware: a request whose Host header this server does not answer to gets 421 (a web
    page that rebinds its own name to 127.0.0.1 would otherwise reach the API); every response says
    nosniff (a browser must not run a JSON error as a script or page)."""

    def __init__(self, app, hosts: AllowedHosts):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = next((value for name, value in scope["headers"] if name == b"host"), None)
        if not self.hosts.allows(host):
            shown = "none" if host is None else repr(host.decode("latin-1"))
            error = RequestError(
                f"this server does not answer to the Host {shown}; call it by an address it "
                "serves on (127.0.0.1, localhost), or start it with --allowed-hosts NAME "
                "to serve that name",
                421,
            )
            return await JSONResponse(error.body(), status_code=421)(scope, receive, _nosniff(send))
        await self.app(scope, receive, _nosniff(send))


def _nosniff(send):
    async def sending(message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (b"x-content-type-options", b"nosniff")]}
        await send(message)

    return sending
