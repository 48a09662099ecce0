"""Reference row: a plain torch.nn.LSTM language model (Embedding -> nn.LSTM -> Linear) trained
the way a user would, on Tiny Shakespeare with nanoGPT's split, and scored like `charlm eval`.

    python scripts/reference_lstm.py                  # 10 minutes: README's reference row
    python scripts/reference_lstm.py --max-steps 20   # smoke check
    python scripts/reference_lstm.py --json           # ... and one JSON object as the last line

Training: B parallel streams read in windows of T characters (truncated BPTT), the state
carried (detached) from window to window and reset at each epoch; Adam, gradient clipping by
global norm; torch's default initialisation. Nothing from charlm's models is used: only the
final score goes through charlm.inference.evaluate.evaluate_ids (64 streams, state carried), the same
function as `charlm eval`, so the figure compares like with like.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from charlm.inference.evaluate import evaluate_ids

# Where `charlm download tinyshakespeare` puts it when run from the repository root.
DEFAULT_DATA = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare" / "input.txt"
RECURRENT = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class TorchNNLM(nn.Module):
    """Embedding -> torch.nn.LSTM / GRU / RNN -> Linear, as a user would write it.

    forward(idx [B, T], state) -> (logits [B, T, V], state), and a `vocab_size` attribute: the
    interface charlm.inference.evaluate needs, so the same scoring code runs on this model."""

    def __init__(
        self, vocab_size: int, embedding_dim: int = 64, hidden_size: int = 256, num_layers: int = 2, kind: str = "lstm"
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.rnn = RECURRENT[kind](embedding_dim, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, idx: torch.Tensor, state=None):
        out, state = self.rnn(self.embedding(idx), state)  # [B, T, H]
        return self.head(out), state  # [B, T, V]


def read_split(path: Path) -> tuple[str, str]:
    """nanoGPT's split: the first 90% of the characters train, the last 10% validate."""
    text = path.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    return text[:cut], text[cut:]


def encode(text: str, index: dict[str, int]) -> torch.Tensor:
    """Ids of the characters the vocabulary has; others are dropped (charlm's rule without <unk>)."""
    return torch.tensor([index[c] for c in text if c in index], dtype=torch.long)


def stream_windows(ids: torch.Tensor, batch: int, seq: int):
    """Yield (inputs, targets [B, T], first) forever: B streams read in order, one window per step.

    `first` marks an epoch's first window, where the carried state restarts."""
    length = (ids.numel() - 1) // batch
    inputs = ids[: batch * length].view(batch, length)  # [B, L]
    targets = ids[1 : batch * length + 1].view(batch, length)  # [B, L]
    while True:
        for start in range(0, length, seq):
            yield inputs[:, start : start + seq], targets[:, start : start + seq], start == 0


def detach(state):
    return tuple(s.detach() for s in state)


def train(model: TorchNNLM, ids: torch.Tensor, args) -> dict:
    """Adam + clipping for args.minutes or args.max_steps, whichever ends first; returns counts."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    windows = stream_windows(ids, args.batch_size, args.seq_len)
    state, steps, chars, loss = None, 0, 0, float("nan")
    budget = args.minutes * 60
    start = time.perf_counter()
    while time.perf_counter() - start < budget and (args.max_steps is None or steps < args.max_steps):
        x, y, first = next(windows)
        if first:  # the streams start again from their beginnings: so does the state
            state = None
        logits, state = model(x, state)
        state = detach(state)  # truncated BPTT: carry the values, not the graph
        loss_t = F.cross_entropy(logits.reshape(-1, model.vocab_size), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss_t.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        steps, chars, loss = steps + 1, chars + y.numel(), loss_t.item()
        if steps % args.log_interval == 0:
            print(f"step {steps:6d}  loss {loss:.4f}  {time.perf_counter() - start:7.1f} s", flush=True)
    seconds = time.perf_counter() - start
    chars_per_epoch = args.batch_size * ((ids.numel() - 1) // args.batch_size)
    return {
        "steps": steps,
        "epochs": chars / chars_per_epoch,
        "train_seconds": seconds,
        "chars_per_s": chars / seconds,
        "last_train_loss": loss,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Tiny Shakespeare's input.txt")
    parser.add_argument("--minutes", type=float, default=10.0, help="training time budget")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (if sooner)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--embedding-dim", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--clip", type=float, default=5.0, help="max global gradient norm")
    parser.add_argument("--seed", type=int, default=0)
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
    model = TorchNNLM(len(chars), args.embedding_dim, args.hidden, args.layers)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"torch.nn.LSTM {args.layers}x{args.hidden}, {params:,} parameters; train {len(train_text):,} chars, "
        f"val {len(val_text):,} chars ({len(val_text) - val_ids.numel()} outside the vocabulary of {len(chars)})"
    )
    result = train(model, train_ids, args)
    scored = evaluate_ids(model, val_ids, streams=64)
    result.update(
        val_loss_nats=scored.loss_nats,
        val_bpc=scored.bpc,
        val_chars_scored=scored.chars,
        parameters=params,
        vocab_size=len(chars),
        hidden=args.hidden,
        layers=args.layers,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        clip=args.clip,
        seed=args.seed,
    )
    print(
        f"{result['steps']} steps ({result['epochs']:.2f} epochs) in {result['train_seconds']:.1f} s, "
        f"{result['chars_per_s']:,.0f} chars/s"
    )
    print(f"val loss {scored.loss_nats:.4f} nats, {scored.bpc:.4f} bpc ({scored.chars:,} characters, 64 streams)")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
