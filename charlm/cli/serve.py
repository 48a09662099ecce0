"""`charlm serve`: a trained model behind an OpenAI-shaped HTTP API, with a playground page."""

from __future__ import annotations

import functools
import importlib
import socket
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any

import typer

from charlm.cli import library as lib
from charlm.cli.common import checked_precision, err_console, in_precision, load_model
from charlm.cli.options import BackendOption, CheckpointOption, DeviceOption
from charlm.errors import UserError

if TYPE_CHECKING:
    from charlm.data.vocab import Vocab
    from charlm.models.model import CharLM

INSTALL_HINT = "charlm serve needs the serving extra: pip install 'charlm[serve]'"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(
    checkpoint: CheckpointOption,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (default: this machine only).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.", min=1, max=65535)] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="CHARLM_API_KEY",
            show_envvar=True,
            help="Require 'Authorization: Bearer KEY' on the API.",
        ),
    ] = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", help="Cap on a request's max_tokens.", min=1, max=1_000_000)
    ] = 2000,
    max_requests: Annotated[
        int, typer.Option("--max-requests", help="Requests in flight at once; more get 429.", min=1, max=4096)
    ] = 64,
    device: DeviceOption = "cpu",
    backend: BackendOption = None,
    precision: Annotated[str, typer.Option("--precision", help="fp32 or bf16 (see charlm sample --help).")] = "fp32",
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads", min=1, max=1024, help="Threads of the generation engine (default: every core but one)."
        ),
    ] = None,
    max_connections: Annotated[
        int,
        typer.Option(
            "--max-connections", min=1, max=65536, help="Open connections at once; more are answered 503 and closed."
        ),
    ] = 256,
    client_timeout: Annotated[
        float,
        typer.Option(
            "--client-timeout",
            min=0.1,
            max=3600,
            help="Seconds a client may take to send a request's head, again its body, and may stop reading a "
            "response; then it is disconnected.",
        ),
    ] = 10.0,
    allowed_hosts: Annotated[
        str | None,
        typer.Option(
            "--allowed-hosts",
            help="Names clients may call this server by (the Host header), comma-separated, '*.example.org' for "
            "subdomains, '*' for any; 127.0.0.1, localhost, ::1 and --host always.",
        ),
    ] = None,
) -> None:
    """Serve a trained model: POST /v1/completions (OpenAI's shape, streaming too), GET /v1/models,
    GET /health, and a playground page at /."""
    uvicorn = _serving_extra()
    hosts = lib.AllowedHosts.parse(host, allowed_hosts)  # a bad name is the user's mistake: before loading anything
    _check_address_free(host, port)
    precision = checked_precision(device, precision)
    # auto is measured here, on a batch of streams stepping one character at a time, and the engine
    # process runs what was picked
    payload, model, vocab, cfg = load_model(checkpoint, device, backend, precision, lib.Workload.generation(16))
    served = lib.served_model(
        checkpoint,
        payload,
        model,
        vocab,
        cfg,
        precision,
        functools.partial(engine_model, checkpoint, device, model.backend, precision),
    )
    server = lib.Server(
        served,
        lib.Limits(max_tokens=max_tokens),
        api_key=api_key,
        max_requests=max_requests,
        threads=threads,
        hosts=hosts,
    )
    if host not in LOOPBACK:
        err_console.print(
            f"warning: listening on {host}, reachable from other machines"
            f"{'' if api_key else ' by anyone (no --api-key)'}"
            f"{'' if allowed_hosts else '; they must call it by a name --allowed-hosts gives'}"
        )
    err_console.print(
        f"serving {served.name} on http://{_url_host(host)}:{port}/ (playground at /, API at /v1); Ctrl-C stops"
    )
    limits = lib.ConnectionLimits(max_connections=max_connections, client_timeout=client_timeout)
    # uvicorn's own keep-alive timeout; the protocol's cap replaces its limit_concurrency (which answers
    # in plain text, and gives a connection over the cap as long as any other to send its head)
    config = uvicorn.Config(
        lib.create_app(server),
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=30,
        access_log=False,
        http=lib.guarded_protocol(limits),
        timeout_keep_alive=limits.keep_alive,
    )
    uvicorn.Server(config).run()


def _serving_extra() -> ModuleType:
    """uvicorn, with charlm.serving (built on starlette) imported; without the serve extra, one line saying so."""
    try:
        import uvicorn  # noqa: PLC0415 - the serve extra, needed by this command alone

        importlib.import_module("charlm.serving.app")
    except ImportError as err:
        if err.name in ("uvicorn", "starlette") or "starlette" in str(err):
            raise UserError(INSTALL_HINT) from None
        raise
    return uvicorn


def engine_model(
    checkpoint: Path, device: str, backend: str | None, precision: str
) -> tuple[CharLM, Vocab, Callable[[], AbstractContextManager[Any]]]:
    """The model, vocabulary and precision context of the engine process (which calls this after spawning)."""
    _, model, vocab, _ = load_model(checkpoint, device, backend, precision)
    return model, vocab, (lambda: in_precision(model, precision))


def _check_address_free(host: str, port: int) -> None:
    """One line, exit 2, when the address cannot be listened on (uvicorn would exit 3 with its own log line)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise UserError(f"--host {host!r} is not an address of this machine; use 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as err:
            raise UserError(
                f"cannot listen on {host}:{port} ({err.strerror}); pick another --port or stop what is using it"
            ) from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
