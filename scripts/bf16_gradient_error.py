#!/usr/bin/env python3
"""How far bf16 gradients are from fp32 ones, per backend, on a trained model and real text.

One batch of B streams x T characters of --text, dropout off, the same weights: the gradient of
the mean cross-entropy with the native fp32 loops is the reference; for each backend under bf16
autocast, prints ||g_bf16 - g_fp32|| / ||g_fp32|| per parameter (and --json, one object).

    python scripts/bf16_gradient_error.py --checkpoint runs/shakespeare_lstm --text val.txt
"""

from __future__ import annotations

import argparse
import json
from typing import Any, cast

import torch
import torch.nn.functional as F

from charlm.data.sources import read_text
from charlm.store.checkpoint import load_checkpoint, model_from_checkpoint


def gradients(payload: dict, backend: str, precision: str, x: torch.Tensor, y: torch.Tensor) -> dict:
    model, _ = model_from_checkpoint(payload, "cpu", backend, precision)
    model.train()
    for module in model.modules():  # dropout off: the same function for every backend
        if hasattr(module, "p"):
            cast(Any, module).p = 0.0  # nn.Module types its attributes as Tensor | Module; p is the rate
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        grads[name] = p.grad.double()
    return grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    payload = load_checkpoint(args.checkpoint)
    _, vocab = model_from_checkpoint(payload, "cpu", "native", "fp32")
    ids = vocab.encode(read_text(args.text)).ids.long()
    n = args.batch * args.seq
    x, y = ids[:n].view(args.batch, args.seq), ids[1 : n + 1].view(args.batch, args.seq)
    reference = gradients(payload, "native", "fp32", x, y)
    result = {}
    for backend in ("native", "fused"):
        grads = gradients(payload, backend, "bf16", x, y)
        result[backend] = {name: float((grads[name] - g).norm() / g.norm()) for name, g in reference.items()}
    width = max(len(name) for name in reference)
    print(f"{'parameter':{width}}  native bf16  fused bf16   (relative error of the gradient against native fp32)")
    for name in reference:
        print(f"{name:{width}}  {result['native'][name]:11.4f}  {result['fused'][name]:10.4f}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
