"""Serving a trained model over HTTP (`charlm serve`).

The engine, torch only: completion.py (a request and whether the engine takes it), rows.py (one
row's text, held back for stop sequences), draw.py (one unit for every row), engine.py (the batch
loop: admit, read prompts, draw, step), worker.py (the engine in a process of its own), and
loading.py (the served model, described from its checkpoint). The web side: api.py (the request
schema and response bodies), intake.py (a request read off HTTP), events.py (the engine's events
queued for one request), streaming.py (those events as a JSON body or server-sent events), app.py
(the Starlette routes and the playground page, playground.html), hosts.py (the Host check) and
connection.py (the connection's limits).

May import torch, `charlm.config`, `charlm.data`, `charlm.inference` and `charlm.errors`; the web stack
(starlette, uvicorn) only in the web side, which the CLI imports lazily, so charlm runs without
the `serve` extra. Never imports `charlm.training`, `charlm.report` or `charlm.cli`.
"""
