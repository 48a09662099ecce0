#!/usr/bin/env python3
"""Sample text from a `charlm export --format onnx` file with numpy and onnxruntime only (no torch,
no charlm): the file carries the vocabulary and the config, so it is all this script needs.

The prompt warms the state up as `charlm sample` does (after a newline; <bos> first for a model
trained with data.documents: lines), then each character costs one run of the single-step model.

    python scripts/onnx_sample.py shakespeare.onnx --prompt "ROMEO:" --length 200 --temperature 0.8 --seed 1

Defaults for --prompt, --length, --temperature, --top-k and --top-p come from the model's config
(its sample section), as in `charlm sample`.
"""

from __future__ import annotations

import argparse
import codecs
import json
import secrets
import sys
import unicodedata
from typing import Any

import numpy as np
import onnxruntime

# The metadata keys `charlm export` writes (charlm/export/metadata.py) and the version this reads.
FORMAT_VERSION, VERSION_KEY, CONFIG_KEY, VOCAB_KEY = 1, "charlm.format_version", "charlm.config", "charlm.vocab"
UNK, BOS_TOKEN, EOS_TOKEN = "<unk>", "<bos>", "<eos>"
BOS, EOS = -1, -2  # document markers among the units (code points or bytes), as in charlm.data.text


class UsageError(Exception):
    """A problem with the file or the options: one line on stderr, exit code 2."""


class Vocabulary:
    """Ids 0..S-1 are the special symbols, then the units: the sorted characters, or the 256 bytes."""

    def __init__(self, data: dict):
        self.unit, self.specials = data["unit"], list(data["specials"])
        self.chars = [] if self.unit == "bytes" else list(data["chars"])
        self.offset = len(self.specials)
        self.index = {ord(c): i for i, c in enumerate(self.chars)}

    def id_of(self, unit: int) -> int | None:
        """The id of a unit (a code point, a byte value or a document marker); None when unknown and
        there is no <unk> (charlm then drops it)."""
        if unit < 0:
            return self.specials.index(BOS_TOKEN if unit == BOS else EOS_TOKEN)
        position = unit if self.unit == "bytes" else self.index.get(unit)
        if position is not None:
            return self.offset + position
        return self.specials.index(UNK) if UNK in self.specials else None

    def unknown_chars(self, text: str) -> list[str]:
        return [] if self.unit == "bytes" else sorted(set(text) - set(self.chars) - {"\n"})


class Decoder:
    """Ids -> text one at a time: bytes wait for a whole UTF-8 character; <unk> prints as U+FFFD,
    <eos> as a newline, <bos> as nothing."""

    def __init__(self, vocab: Vocabulary):
        self.vocab = vocab
        self.bytes = codecs.getincrementaldecoder("utf-8")("replace") if vocab.unit == "bytes" else None

    def feed(self, index: int) -> str:
        vocab = self.vocab
        if index < vocab.offset:
            return self.flush() + {UNK: "\ufffd", EOS_TOKEN: "\n", BOS_TOKEN: ""}[vocab.specials[index]]
        if self.bytes is not None:
            return self.bytes.decode(bytes([index - vocab.offset]))
        return vocab.chars[index - vocab.offset]

    def flush(self) -> str:
        return self.bytes.decode(b"", final=True) if self.bytes is not None else ""


def units_of(text: str, unit: str) -> list[int]:
    return list(text.encode("utf-8")) if unit == "bytes" else [ord(c) for c in text]


def prompt_ids(vocab: Vocabulary, data: dict, prompt: str) -> list[int]:
    """The ids that warm the state up for `prompt`, as charlm.inference.sample.prompt_ids makes them."""
    unknown = vocab.unknown_chars(prompt)
    if unknown and UNK not in vocab.specials:
        raise UsageError(
            f"the prompt has {len(unknown)} character(s) the model never saw in training: "
            f"{', '.join(map(repr, unknown[:10]))}; remove them"
        )
    if unknown:
        print(
            f"warning: the prompt's characters {', '.join(map(repr, unknown[:10]))} never occurred in training; "
            "they are read as <unk>",
            file=sys.stderr,
        )
    text = prompt
    if data.get("newlines") == "lf":
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if data.get("normalize", "none") != "none":
        text = unicodedata.normalize(data["normalize"], text)
    if BOS_TOKEN in vocab.specials:  # documents mode: each non-empty line is <bos> line <eos>
        units = [BOS]
        if text.strip():
            units = [u for line in text.split("\n") if line for u in (BOS, *units_of(line, vocab.unit), EOS)]
            units = units[:-1]  # the prompt's last line goes on
    else:  # after a newline, where text most often starts afresh (see charlm's prompt_context)
        newline_known = vocab.unit == "bytes" or "\n" in vocab.chars
        units = units_of("\n" + text if newline_known and not text.startswith("\n") else text, vocab.unit)
    ids = [i for i in map(vocab.id_of, units) if i is not None]
    return ids or [vocab.offset]


def pick_next(
    logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None, rng: np.random.Generator
) -> np.ndarray:
    """One id per row of logits [B, V]: greedy at temperature 0, else drawn after top-k, then top-p."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    logits = logits.astype(np.float64) / temperature  # [B, V]
    if top_k is not None and top_k < logits.shape[-1]:
        kept = np.argpartition(-logits, top_k - 1, axis=-1)[:, :top_k]  # [B, k]
        masked = np.full_like(logits, -np.inf)
        np.put_along_axis(masked, kept, np.take_along_axis(logits, kept, axis=-1), axis=-1)
        logits = masked
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")  # [B, V], most likely first
        ranked = softmax(np.take_along_axis(logits, order, axis=-1))
        mass_before = np.cumsum(ranked, axis=-1) - ranked  # the top id always has 0
        np.put_along_axis(
            logits, order, np.where(mass_before >= top_p, -np.inf, np.take_along_axis(logits, order, axis=-1)), axis=-1
        )
    probs = softmax(logits)
    return np.array([rng.choice(len(row), p=row) for row in probs])


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class StepModel:
    """The exported single-step model: ids [B] and the state in, logits [B, V] and the new state out."""

    def __init__(self, path: str):
        try:
            self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as err:
            raise UsageError(
                f"cannot load {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
            ) from err
        meta = self.session.get_modelmeta().custom_metadata_map
        version = meta.get(VERSION_KEY)
        if version is None or CONFIG_KEY not in meta or VOCAB_KEY not in meta:
            raise UsageError(f"{path} was not written by charlm export (no charlm metadata)")
        if not version.isdigit() or int(version) > FORMAT_VERSION:
            raise UsageError(f"{path} has export format {version}, newer than this script reads ({FORMAT_VERSION})")
        self.config, self.vocab = json.loads(meta[CONFIG_KEY]), Vocabulary(json.loads(meta[VOCAB_KEY]))
        self.inputs = self.session.get_inputs()  # ids [batch], then each state tensor [L, batch, H]

    def blank_state(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((node.shape[0], batch, node.shape[2]), dtype=np.float32) for node in self.inputs[1:]]

    def step(self, ids: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {"ids": ids.astype(np.int64), **{node.name: s for node, s in zip(self.inputs[1:], state)}}
        logits, *state = self.session.run(None, feeds)
        return logits, state


def generate(
    model: StepModel,
    context: list[int],
    length: int,
    num_samples: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    rng: np.random.Generator,
    stop_id: int | None = None,
    on_step=None,
) -> np.ndarray:
    """Read the prompt ids one step at a time from a blank state, then draw `length` ids for each of
    `num_samples` samples [N, length'] (ending once every sample has drawn `stop_id`)."""
    state = model.blank_state(1)
    for index in context:
        logits, state = model.step(np.array([index]), state)  # [1, V]
    logits = np.repeat(logits, num_samples, axis=0)  # [N, V]
    state = [np.repeat(s, num_samples, axis=1) for s in state]  # each [L, N, H]
    out = np.zeros((num_samples, length), dtype=np.int64)
    finished = np.zeros(num_samples, dtype=bool)
    for t in range(length):
        out[:, t] = pick_next(logits, temperature, top_k, top_p, rng)
        if on_step is not None:
            on_step(int(out[0, t]))
        if stop_id is not None:
            finished |= out[:, t] == stop_id
            if finished.all():
                return out[:, : t + 1]
        if t + 1 < length:
            logits, state = model.step(out[:, t], state)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the .onnx file charlm export wrote")
    parser.add_argument("--prompt", "-p", help="text to start from (default: the config's sample.prompt)")
    parser.add_argument("--length", "-n", type=int, help="characters to generate per sample")
    parser.add_argument("--temperature", "-t", type=float, help="0 = greedy; <1 safer, >1 wilder")
    parser.add_argument("--top-k", type=int, help="draw only from the k most likely characters")
    parser.add_argument("--top-p", type=float, help="draw only from the nucleus of probability p, in (0, 1]")
    parser.add_argument("--seed", type=int, help="random seed: the same seed gives the same text")
    parser.add_argument("--num-samples", type=int, default=1, help="samples drawn together, in one batch")
    parser.add_argument(
        "--stop-at-end",
        action="store_true",
        help="end each sample at its document's end marker (data.documents: lines)",
    )
    return parser.parse_args(argv)


def settings(args: argparse.Namespace, defaults: dict) -> dict:
    """The decoding settings: each option, else the config's sample section; checked."""
    chosen: dict[str, Any] = {
        key: getattr(args, key) if getattr(args, key) is not None else defaults.get(key)
        for key in ("length", "temperature", "top_k", "top_p", "seed")
    }
    chosen["prompt"] = args.prompt or defaults.get("prompt") or "\n"  # an empty --prompt: the default
    chosen["temperature"] = 1.0 if chosen["temperature"] is None else chosen["temperature"]
    if not chosen["length"] or chosen["length"] < 1:
        raise UsageError(f"--length must be at least 1 (got {chosen['length']})")
    if chosen["temperature"] < 0:
        raise UsageError(f"--temperature must be 0 or more (got {chosen['temperature']})")
    if chosen["top_k"] is not None and chosen["top_k"] < 1:
        raise UsageError(f"--top-k must be at least 1 (got {chosen['top_k']})")
    if chosen["top_p"] is not None and not 0 < chosen["top_p"] <= 1:
        raise UsageError(f"--top-p must be in (0, 1] (got {chosen['top_p']})")
    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be at least 1 (got {args.num_samples})")
    return chosen


def run(args: argparse.Namespace) -> None:
    model = StepModel(args.model)
    vocab, chosen = model.vocab, settings(args, model.config.get("sample", {}))
    stop_id = None
    if args.stop_at_end:
        if EOS_TOKEN not in vocab.specials:
            raise UsageError("--stop-at-end needs a model trained with data.documents: lines (it has no end marker)")
        stop_id = vocab.specials.index(EOS_TOKEN)
    context = prompt_ids(vocab, model.config.get("data", {}), chosen["prompt"])
    seed = chosen["seed"] if chosen["seed"] is not None else secrets.randbits(32)
    rng = np.random.default_rng(seed)
    draw = dict(
        length=chosen["length"],
        num_samples=args.num_samples,
        temperature=chosen["temperature"],
        top_k=chosen["top_k"],
        top_p=chosen["top_p"],
        rng=rng,
        stop_id=stop_id,
    )
    if args.num_samples == 1:
        decoder, done = Decoder(vocab), [False]

        def on_step(index: int) -> None:
            if done[0] or index == stop_id:
                done[0] = True
                return
            sys.stdout.write(decoder.feed(index))
            sys.stdout.flush()

        sys.stdout.write(chosen["prompt"])
        generate(model, context, on_step=on_step, **draw)
        sys.stdout.write(decoder.flush() + "\n")
    else:
        for k, row in enumerate(generate(model, context, **draw).tolist()):
            row = row[: row.index(stop_id)] if stop_id in row else row
            decoder = Decoder(vocab)
            text = "".join(decoder.feed(i) for i in row) + decoder.flush()
            sys.stdout.write(f"==> sample {k + 1} <==\n{chosen['prompt']}{text}\n")
    if chosen["seed"] is None:
        print(f"seed {seed} (pass --seed {seed} to draw the same text again)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except UsageError as err:
        print(f"onnx_sample.py: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
