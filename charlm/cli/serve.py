"""`charlm serve`: a trained model behind an OpenAI-shaped HTTP API, with a playground page."""

from __future__ import annotations

import functools
import socket
from pathlib import Path
from typing import Optional

import typer

from charlm.cli.common import BACKEND_HELP, CHECKPOINT_HELP, app, err_console, load_model
from charlm.errors import UserError

INSTALL_HINT = "charlm serve needs the serving extra: pip install 'charlm[serve]'"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@app.command()
def serve(
    checkpoint: Path = typer.Option(..., "--checkpoint", help=CHECKPOINT_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (default: this machine only)."),
    port: int = typer.Option(8000, "--port", help="TCP port.", min=1, max=65535),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="CHARLM_API_KEY", show_envvar=True,
                                          help="Require 'Authorization: Bearer KEY' on the API."),
    max_tokens: int = typer.Option(2000, "--max-tokens", help="Cap on a request's max_tokens.", min=1,
                                   max=1_000_000),
    max_requests: int = typer.Option(64, "--max-requests", help="Requests in flight at once; more get 429.",
                                     min=1, max=4096),
    device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    backend: Optional[str] = typer.Option(None, "--backend", help=BACKEND_HELP),
    precision: str = typer.Option("fp32", "--precision", help="fp32 or bf16 (see charlm sample --help)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=1024,
                                          help="Threads of the generation engine (default: every core but one)."),
    max_connections: int = typer.Option(256, "--max-connections", min=1, max=65536,
                                        help="Open connections at once; more are answered 503 and closed."),
    client_timeout: float = typer.Option(10.0, "--client-timeout", min=0.1, max=3600,
                                         help="Seconds a client may take to send a request's head, again its "
                                              "body, and may stop reading a response; then it is disconnected."),
    allowed_hosts: Optional[str] = typer.Option(None, "--allowed-hosts",
                                                help="Names clients may call this server by (the Host header), "
                                                     "comma-separated, '*.example.org' for subdomains, '*' for any; "
                                                     "127.0.0.1, localhost, ::1 and --host always."),
) -> None:
    """Serve a trained model: POST /v1/completions (OpenAI's shape, streaming too), GET /v1/models,
    GET /health, and a playground page at /."""
    try:
        import uvicorn  # noqa: PLC0415

        from charlm.serving.app import Server, create_app  # noqa: PLC0415
        from charlm.serving.connection import ConnectionLimits, guarded_protocol  # noqa: PLC0415
        from charlm.serving.hosts import AllowedHosts  # noqa: PLC0415
        from charlm.serving.api import Limits  # noqa: PLC0415
    except ImportError as err:
        if err.name in ("uvicorn", "starlette") or "starlette" in str(err):
            raise UserError(INSTALL_HINT) from None
        raise
    from charlm.cli.use import _usable_precision  # noqa: PLC0415
    from charlm.serving.loading import served_model  # noqa: PLC0415

    hosts = AllowedHosts.parse(host, allowed_hosts)  # a bad name is the user's mistake: before loading anything
    _check_address_free(host, port)
    precision = _usable_precision(device, precision)
    from charlm.models.autotune import Workload  # noqa: PLC0415

    # auto is measured here, on a batch of streams stepping one character at a time, and the engine
    # process runs what was picked
    payload, model, vocab, cfg = load_model(checkpoint, device, backend, precision, Workload.generation(16))
    served = served_model(checkpoint, payload, model, vocab, cfg, precision,
                          functools.partial(engine_model, checkpoint, device, model.backend, precision))
    server = Server(served, Limits(max_tokens=max_tokens), api_key=api_key, max_requests=max_requests,
                    threads=threads, hosts=hosts)
    if host not in LOOPBACK:
        err_console.print(f"warning: listening on {host}, reachable from other machines"
                          f"{'' if api_key else ' by anyone (no --api-key)'}"
                          f"{'' if allowed_hosts else '; they must call it by a name --allowed-hosts gives'}")
    err_console.print(f"serving {served.name} on http://{_url_host(host)}:{port}/ (playground at /, API at /v1); "
                      "Ctrl-C stops")
    limits = ConnectionLimits(max_connections=max_connections, client_timeout=client_timeout)
    # uvicorn's own keep-alive timeout; the protocol's cap replaces its limit_concurrency (which answers
    # in plain text, and gives a connection over the cap as long as any other to send its head)
    config = uvicorn.Config(create_app(server), host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=30, access_log=False, http=guarded_protocol(limits),
                            timeout_keep_alive=limits.keep_alive)
    uvicorn.Server(config).run()


def engine_model(checkpoint: Path, device: str, backend: Optional[str], precision: str):
    """The model, vocabulary and precision context of the engine process (which calls this after spawning)."""
    from charlm.cli.use import _in_precision  # noqa: PLC0415

    _, model, vocab, _ = load_model(checkpoint, device, backend, precision)
    return model, vocab, (lambda: _in_precision(model, precision))


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
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port or stop "
                            "what is using it") from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
