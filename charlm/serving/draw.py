"""One unit for every row of the engine's batch, each request drawn as `charlm sample` would draw
it alone, the requests with the same settings in one call."""

from __future__ import annotations

import torch

from charlm.inference.sample import Decoding, pick, uniforms
from charlm.serving.completion import Completion
from charlm.serving.rows import Row


def draw_units(rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
    """One unit per row [N] (on the CPU), as pick_next would draw it for each request alone: each
    request takes its uniform numbers from its own generator, then the rows of all requests with
    the same settings are drawn in one call (one multinomial call per request cost more than the
    batched model step at 32 requests). Every unit is in range, whatever the scores."""
    parts: dict[Decoding, tuple[list[int], list[torch.Tensor]]] = {}
    start = 0
    for job, count in _groups(rows):
        if not job.cancelled.is_set():
            index, draws = parts.setdefault(job.decoding, ([], []))
            index.extend(range(start, start + count))
            if job.decoding.temperature > 0:
                draws.append(uniforms(count, job.generator, logits.device))
        start += count
    units = torch.zeros(len(rows), dtype=torch.long)
    for decoding, (index, draws) in parts.items():
        every_row = len(index) == len(rows)
        chosen = logits if every_row else logits[torch.tensor(index, device=logits.device)]
        picked = pick(chosen, decoding, torch.cat(draws) if draws else None)
        if every_row:
            return picked.cpu()
        units[torch.tensor(index)] = picked.cpu()
    return units


def _groups(rows: list[Row]) -> list[tuple[Completion, int]]:
    """Consecutive rows of the same request: (request, row count), in batch order."""
    groups: list[tuple[Completion, int]] = []
    for row in rows:
        if groups and groups[-1][0] is row.job:
            groups[-1] = (row.job, groups[-1][1] + 1)
        else:
            groups.append((row.job, 1))
    return groups
