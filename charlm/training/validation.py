"""Validation during training: the val loss over every rank's share, whether it is the best so far,
and the short preview sample shown with it. The Trainer records, logs and checkpoints the result."""

from __future__ import annotations

import math

import torch

from charlm.config import Config
from charlm.data.text import TextSettings
from charlm.data.vocab import Vocab
from charlm.inference.evaluate import EvalResult, evaluate_totals, result_of
from charlm.inference.sample import Decoding, generate, prompt_ids
from charlm.models.model import CharLM
from charlm.training import distributed
from charlm.training.distributed import World


def validate(model: CharLM, val_ids: torch.Tensor, batch_size: int, world: World, device: torch.device) -> EvalResult:
    """The whole val split; under torchrun each rank scores its share and the sums are reduced."""
    total, count = evaluate_totals(model, val_ids, batch_size, part=(world.rank, world.size))
    total_all, count_all = distributed.sum_over_ranks([total, float(count)], world, device)
    return result_of(total_all, int(count_all))


def is_new_best(result: EvalResult, best_so_far: float | None) -> bool:
    """A finite loss below every earlier one: best.pt is written with it."""
    return math.isfinite(result.loss_nats) and (best_so_far is None or result.loss_nats < best_so_far)


def preview(model: CharLM, cfg: Config, vocab: Vocab, step: int, device: torch.device, length: int = 120) -> str:
    """A short sample from the sample section's prompt. Its own generator: the training
    RNG (dropout) is untouched, so a run with previews equals one without."""
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed + step)
    context, _ = prompt_ids(vocab, cfg.sample.prompt, TextSettings.from_config(cfg.data))
    out = generate(model, context, length, 1, Decoding.of(cfg.sample), generator)
    return vocab.decode(out[0])
