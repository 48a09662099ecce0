"""Reference row: a small character-level GPT built from torch.nn only, trained with nanoGPT's
documented CPU recipe for shakespeare_char, and scored on nanoGPT's validation split.

    python scripts/reference_gpt.py                  # the recipe as documented: 2000 iterations
    python scripts/reference_gpt.py --minutes 10     # README's row: the recipe stretched to 10 minutes
    python scripts/reference_gpt.py --max-steps 20   # smoke check
    python scripts/reference_gpt.py --json           # ... and one JSON object as the last line

Defaults are the recipe in nanoGPT's README (`train.py config/train_shakespeare_char.py
--device=cpu --compile=False --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
--n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0`) with that config's
optimiser: AdamW lr 1e-3, betas (0.9, 0.99), weight decay 0.1 on weight matrices and
embeddings only, gradient clipping at 1.0, 100 warmup iterations then a cosine down to 1e-4 at
the last iteration. With --minutes the same schedule follows the fraction of the time spent.

Batches are random windows of block_size characters from the training text (nanoGPT's
sampling). Score: the validation text is cut into consecutive, non-overlapping windows of
block_size characters, so every character but the first is predicted exactly once, with
1 to block_size characters of context (what nanoGPT's random-window estimate averages over).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Where `charlm download tinyshakespeare` puts it when run from the repository root.
DEFAULT_DATA = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare" / "input.txt"
IGNORE = -100  # target id of padding in the last validation window


class CharGPT(nn.Module):
    """Token + learned position embedding -> pre-norm Transformer blocks (causal) -> LayerNorm -> Linear."""

    def __init__(self, vocab_size: int, block_size: int, layers: int, heads: int, width: int, dropout: float):
        super().__init__()
        self.block_size = block_size
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Embedding(block_size, width)
        self.dropout = nn.Dropout(dropout)
        block = nn.TransformerEncoderLayer(
            width,
            heads,
            dim_feedforward=4 * width,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # enable_nested_tensor only helps padded batches, which we never have (and pre-norm can't use it).
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.head.weight = self.tokens.weight  # tied input and output embeddings, as GPT-2 and nanoGPT do
        self._init_weights(layers)

    def _init_weights(self, layers: int) -> None:
        """GPT-2's init: weights N(0, 0.02), biases 0; the two projections that add into the residual
        stream scaled by 1/sqrt(2 * layers), so the stream's variance does not grow with depth."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks.layers:
            attention = block.self_attn
            nn.init.normal_(attention.in_proj_weight, std=0.02)  # q, k, v: not an nn.Linear
            nn.init.zeros_(attention.in_proj_bias)
            for residual in (attention.out_proj.weight, block.linear2.weight):
                nn.init.normal_(residual, std=0.02 / math.sqrt(2 * layers))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [B, T] (T <= block_size) -> logits [B, T, V]; position t sees positions 0..t only."""
        T = idx.shape[1]
        x = self.tokens(idx) + self.positions(torch.arange(T, device=idx.device))  # [B, T, C]
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=idx.device)  # [T, T], -inf above the diagonal
        x = self.blocks(self.dropout(x), mask=mask, is_causal=True)  # [B, T, C]
        return self.head(self.norm(x))  # [B, T, V]


def read_split(path: Path) -> tuple[str, str]:
    """nanoGPT's split: the first 90% of the characters train, the last 10% validate."""
    text = path.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    return text[:cut], text[cut:]


def encode(text: str, index: dict[str, int]) -> torch.Tensor:
    """Ids of the characters the vocabulary has; others are dropped (neither fed nor scored)."""
    return torch.tensor([index[c] for c in text if c in index], dtype=torch.long)


def random_windows(ids: torch.Tensor, batch: int, block: int, generator: torch.Generator):
    """Inputs and targets [B, block] from B random places in the text (targets shifted by one)."""
    starts = torch.randint(ids.numel() - block, (batch,), generator=generator)
    rows = starts[:, None] + torch.arange(block)  # [B, block]
    return ids[rows], ids[rows + 1]


def learning_rate(progress: float, args) -> float:
    """Linear warmup, then a cosine from lr to min_lr; progress in [0, 1] is iterations or time."""
    warmup = args.warmup_iters / args.max_iters  # the warmup's share of the run
    if progress < warmup:
        return args.lr * progress / warmup
    ratio = min(1.0, (progress - warmup) / (1 - warmup))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)


def make_optimizer(model: nn.Module, args) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only; biases and LayerNorm gains are not decayed."""
    params = list(model.parameters())  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.99))


def progress_of(steps_done: int, start: float, args) -> float:
    """The share of the run spent: of the minutes with --minutes, else of the iterations."""
    if args.minutes is not None:
        return (time.perf_counter() - start) / (args.minutes * 60)
    return steps_done / args.max_iters


def train(model: CharGPT, ids: torch.Tensor, args) -> dict:
    """Train until the iterations (or minutes) run out, or --max-steps; returns counts."""
    optimizer = make_optimizer(model, args)
    generator = torch.Generator().manual_seed(args.seed)
    step, loss = 0, float("nan")
    start = time.perf_counter()
    while progress_of(step, start, args) < 1 and (args.max_steps is None or step < args.max_steps):
        lr = learning_rate(progress_of(step + 1, start, args), args)  # + 1: the first step learns too
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = random_windows(ids, args.batch_size, args.block_size, generator)
        loss_t = F.cross_entropy(model(x).reshape(-1, model.head.out_features), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss_t.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        step, loss = step + 1, loss_t.item()
        if step % args.log_interval == 0:
            print(f"iter {step:6d}  loss {loss:.4f}  lr {lr:.2e}  {time.perf_counter() - start:7.1f} s", flush=True)
    seconds = time.perf_counter() - start
    return {
        "steps": step,
        "train_seconds": seconds,
        "chars_per_s": step * args.batch_size * args.block_size / seconds,
        "last_train_loss": loss,
    }


@torch.no_grad()
def score(model: CharGPT, ids: torch.Tensor, windows_per_batch: int = 256) -> tuple[float, int]:
    """Mean cross-entropy (nats) over non-overlapping block_size windows, and the predictions made."""
    model.eval()
    block, predictions = model.block_size, ids.numel() - 1
    rows = -(-predictions // block)
    inputs = torch.zeros(rows * block, dtype=torch.long)
    targets = torch.full((rows * block,), IGNORE, dtype=torch.long)
    inputs[:predictions], targets[:predictions] = ids[:-1], ids[1:]
    inputs, targets = inputs.view(rows, block), targets.view(rows, block)  # [N, block]
    total = 0.0
    for first in range(0, rows, windows_per_batch):
        logits = model(inputs[first : first + windows_per_batch])  # [n, block, V]
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            targets[first : first + windows_per_batch].reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        ).item()
    return total / predictions, predictions


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Tiny Shakespeare's input.txt")
    parser.add_argument("--max-iters", type=int, default=2000, help="run length and schedule (nanoGPT's max_iters)")
    parser.add_argument(
        "--minutes", type=float, default=None, help="run for this long instead; the schedule follows time"
    )
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps, schedule unchanged")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--layers", type=int, default=4, help="nanoGPT's n_layer")
    parser.add_argument("--heads", type=int, default=4, help="nanoGPT's n_head")
    parser.add_argument("--width", type=int, default=128, help="nanoGPT's n_embd")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--min-lr", type=float, default=1e-4)
    parser.add_argument("--warmup-iters", type=int, default=100, help="warmup, as a share of --max-iters")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--log-interval", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if not args.data.is_file():
        print(
            f"error: data file not found: {args.data} (run `charlm download tinyshakespeare` from the "
            "repository root, or give Tiny Shakespeare's input.txt with --data)",
            file=sys.stderr,
        )
        sys.exit(2)
    torch.manual_seed(args.seed)
    train_text, val_text = read_split(args.data)
    chars = sorted(set(train_text))
    index = {c: i for i, c in enumerate(chars)}
    train_ids, val_ids = encode(train_text, index), encode(val_text, index)
    model = CharGPT(len(chars), args.block_size, args.layers, args.heads, args.width, args.dropout)
    params = sum(p.numel() for p in model.parameters())
    budget = f"{args.minutes:g} minutes" if args.minutes is not None else f"{args.max_iters} iterations"
    print(
        f"GPT {args.layers} layers x {args.width}, {args.heads} heads, block {args.block_size}: "
        f"{params:,} parameters; {budget}; train {len(train_text):,} chars, val {len(val_text):,} chars"
    )
    result = train(model, train_ids, args)
    loss, predictions = score(model, val_ids)
    result.update(
        val_loss_nats=loss,
        val_bpc=loss / math.log(2),
        val_chars_scored=predictions,
        parameters=params,
        vocab_size=len(chars),
        **{k: v for k, v in vars(args).items() if k not in ("data", "json")},
    )
    print(f"{result['steps']} iterations in {result['train_seconds']:.1f} s, {result['chars_per_s']:,.0f} chars/s")
    print(
        f"val loss {loss:.4f} nats, {loss / math.log(2):.4f} bpc ({predictions:,} characters, "
        f"non-overlapping windows of {args.block_size})"
    )
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
