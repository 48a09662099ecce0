"""Serving a trained model over HTTP (`charlm serve`): the batched generation engine (engine.py,
torch only), the request schema and response bodies (api.py), the Starlette app and its
playground page (app.py, playground.html), and the served model's description (loading.py).

May import torch, `charlm.data`, `charlm.inference` and `charlm.errors`; the web stack
(starlette, uvicorn) only in app.py, which the CLI imports lazily, so charlm runs without
the `serve` extra. Never imports `charlm.training`, `charlm.report` or `charlm.cli`.
"""
