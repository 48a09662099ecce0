"""Text generation: the decoding settings, a pure `pick_next` rule and a state-caching generation loop."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from charlm.data.text import BOS, EOS, TextSettings, transform, units_of
from charlm.data.vocab import UNK, Vocab
from charlm.errors import UserError


@dataclass(frozen=True)
class Decoding:
    """How the next id is drawn from the logits: temperature (0 = greedy), then top_k, then top_p."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    @classmethod
    def of(cls, settings) -> Decoding:
        """The decoding part of a sample section (config.SampleConfig) or anything with the same fields."""
        return cls(settings.temperature, settings.top_k, settings.top_p)

    def problem(self) -> DecodingProblem | None:
        """The first setting nothing can be drawn with (None: all can be). Any finite temperature >= 0
        can: a tiny one is greedy decoding (see scaled_logits), a huge one about uniform."""
        t, k, p = self.temperature, self.top_k, self.top_p
        if not (math.isfinite(t) and t >= 0):  # NaN fails this too
            return DecodingProblem("temperature", f"must be a finite number >= 0 (0 is greedy), not {t}")
        if k is not None and k < 1:
            return DecodingProblem("top_k", f"must be at least 1, not {k}")
        if p is not None and not 0 < p <= 1:
            return DecodingProblem("top_p", f"must be in (0, 1], not {p}")
        return None


class DecodingProblem(NamedTuple):
    """A decoding setting nothing can be drawn with: the field and what is wrong with its value."""

    field: str
    reason: str


class Undrawable(ValueError):
    """Some rows' scores are not finite (NaN or infinity): no id can be drawn from them."""

    def __init__(self, rows: list[int]):
        super().__init__(
            f"the model's scores for sample(s) {', '.join(str(r + 1) for r in rows)} are not finite (NaN or infinity)"
        )
        self.rows = rows


def pick_next(
    logits: torch.Tensor, decoding: Decoding = Decoding(), generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw one id per row of logits [B, V] -> [B] (int64).

    temperature 0 is greedy (argmax). top_k keeps the k highest logits; top_p keeps the
    smallest set of most likely ids whose probability reaches p (the nucleus); both apply
    after temperature scaling, top_k first. Raises Undrawable when a row's scores are not finite."""
    problem = decoding.problem()
    if problem is not None:
        raise ValueError(f"{problem.field} {problem.reason}")
    u = None if decoding.temperature == 0 else uniforms(logits.shape[0], generator, logits.device)
    ids = pick(logits, decoding, u)
    bad = chosen_probs(logits, ids).isnan()
    if bool(bad.any()):
        raise Undrawable(bad.nonzero().flatten().tolist())
    return ids


def pick(logits: torch.Tensor, decoding: Decoding, u: torch.Tensor | None) -> torch.Tensor:
    """One id per row of logits [B, V] with uniform numbers u [B] (None for greedy decoding) -> [B].
    Every id is in range whatever the scores (argmax's are; inverse_cdf's are clamped), so a row
    of NaN or infinite scores cannot index past the vocabulary (on CUDA an out-of-range index is
    a device-side assert that ends the process's CUDA context, every request with it); its id is
    meaningless, and chosen_probs says which rows those are."""
    if decoding.temperature == 0:
        return logits.argmax(dim=-1)
    assert u is not None, "drawing at a temperature above 0 needs the uniform numbers"
    return inverse_cdf(sampling_probs(logits, decoding), u)


def chosen_probs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The model's probability of each row's id: logits [B, V], ids [B] -> [B] (float32). NaN
    exactly where the row's scores are not finite (a NaN, a +inf, or only -inf make every entry
    of the row's softmax NaN), so it doubles as the check that a row could be drawn from: the
    server computes these probabilities anyway (it sends them), and a separate check on every
    character made a one-stream server 5% slower. (Sampling scales the scores first: at a
    temperature above SHIFT_BELOW only scores beyond 1e32 could overflow there and not here; the
    id drawn for such a row is in range but meaningless.)"""
    return torch.softmax(logits.float(), dim=-1).gather(1, ids[:, None].to(logits.device))[:, 0]


def sampling_probs(logits: torch.Tensor, decoding: Decoding) -> torch.Tensor:
    """The distribution pick_next draws from (temperature > 0), row by row: logits [B, V] -> probs [B, V].

    Every operation is per row, so rows computed together give what each gives alone (the
    server computes many requests' rows in one call and draws each with its own generator)."""
    logits = scaled_logits(logits, decoding.temperature)  # [B, V]
    if decoding.top_k is not None and decoding.top_k < logits.shape[-1]:
        values, indices = logits.topk(decoding.top_k, dim=-1)  # [B, k]
        logits = torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)
    if decoding.top_p is not None and decoding.top_p < 1.0:
        logits = _nucleus(logits, decoding.top_p)
    return torch.softmax(logits, dim=-1)  # [B, V]


SHIFT_BELOW = 1e-6  # temperatures under which scaled_logits shifts the scores first


def scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits [B, V] / temperature (> 0), in float32, computed so that no temperature can overflow them.

    Plain logits / 1e-300 made every score infinite, the softmax NaN and the draw an id one past
    the vocabulary. Below SHIFT_BELOW each row's largest score is subtracted first (softmax does
    not change), so the scaled scores are <= 0 with the largest exactly 0; one far below it may
    become -inf, probability 0, its limit anyway; and a temperature below float32's normal range
    (which float32 would hold as 0) is divided in float64, where it is not 0 down to 5e-324.
    So a tiny temperature is greedy decoding, the distribution's limit as the temperature goes
    to 0 (ties share), not an error: turning the temperature down is how a user asks for more
    predictable text. Above SHIFT_BELOW only scores beyond 1e32 could overflow, which no working
    model gives (such a row fails alone); the shift is skipped there because a server scales
    once per character and the two extra operations cost several percent of a one-stream step."""
    logits = logits.float()
    if temperature >= SHIFT_BELOW:
        return logits / temperature
    shifted = logits - logits.amax(dim=-1, keepdim=True)  # NaN in a row with NaN, +inf or only -inf
    if temperature < torch.finfo(torch.float32).tiny:
        return (shifted.double() / temperature).float()
    return shifted / temperature


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row of probs [B, V] -> [B]: one uniform number per row from `generator`, then
    inverse_cdf. (Not torch.multinomial: a server draws every request's rows with one inverse_cdf
    call after one small rand call per request, which costs a tenth of one multinomial call per request.)"""
    return inverse_cdf(probs, uniforms(probs.shape[0], generator, probs.device))


def uniforms(count: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """`count` numbers uniform in [0, 1) from `generator`: [count] (float64)."""
    return torch.rand(count, generator=generator, device=device, dtype=torch.float64)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The id whose slice of [0, 1) holds u, row by row: probs [B, V] (each row summing to about 1),
    u [B] -> ids [B]. An id of probability 0 has an empty slice, so it is never drawn. A row with
    NaN (from NaN or infinite scores) gets some id in range."""
    cdf = probs.double().cumsum(dim=-1)  # [B, V]; float64 so that rounding cannot open an empty slice
    total = cdf[:, -1:]
    # u * total can round up to total itself: kept below it, the first cdf above it is the last id
    # with a non-empty slice (the ids after it, of probability 0, have the same cdf).
    point = torch.minimum(u.unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
    ids = torch.searchsorted(cdf, point, right=True).clamp_(max=probs.shape[-1] - 1)  # a NaN cdf: any index
    return ids.squeeze(-1)


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-p nucleus of its row."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the ids ranked above each one
    outside = mass_before >= top_p
    # The top id always stays (its mass_before is 0): a top_p below float32's range, such as 5e-324,
    # compares as 0, and 0 >= 0 would drop every id of the row.
    outside[:, 0] = False
    sorted_logits[outside] = float("-inf")
    return torch.full_like(logits, float("-inf")).scatter_(-1, order, sorted_logits)


def prompt_context(prompt: str, vocab_chars: list[str]) -> str:
    """The text the state is warmed up on: the prompt, after a newline when it lacks one.

    A model only meets a blank state at the very start of its training streams, so a prompt
    read from a blank state begins mid-nowhere (and "ROMEO:" continues as gibberish). A
    newline is where text most often starts afresh, so it gives the prompt a familiar start.
    The newline is context only: it is not printed."""
    if "\n" in vocab_chars and not prompt.startswith("\n"):
        return "\n" + prompt
    return prompt


def prompt_ids(vocab: Vocab, prompt: str, settings: TextSettings) -> tuple[torch.Tensor, list[str]]:
    """Ids that warm the state up for `prompt`, and the prompt's characters the model never saw.

    Documents mode: <bos> then the prompt (a document's first characters). Otherwise the
    prompt after a newline (see prompt_context). Unseen characters become <unk> when the
    vocabulary has it (the caller warns); without <unk> they are an error."""
    unknown = vocab.unknown_chars(prompt)
    if unknown and UNK not in vocab.specials:
        shown = ", ".join(repr(c) for c in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise UserError(
            f"the prompt has {len(unknown)} character(s) the model never saw in training: {shown}; "
            "remove them or retrain on text that contains them"
        )
    text = transform(prompt, settings)
    if vocab.documents:
        units = units_of(text, settings) if text.strip() else torch.tensor([BOS], dtype=torch.int32)
        if units[-1] == EOS:
            units = units[:-1]  # the prompt's line goes on
    else:
        newline_known = vocab.unit == "bytes" or "\n" in vocab.chars
        units = units_of(prompt_context(text, ["\n"] if newline_known else []), settings)
    ids = vocab.map_units(units).ids.long()
    if ids.numel() == 0:  # e.g. the default "\n" for a vocabulary without a newline
        ids = torch.tensor([vocab.offset])
    return ids, unknown


def make_generator(device: torch.device, seed: int | None) -> tuple[torch.Generator, int]:
    """A generator on `device`, seeded with `seed` or a fresh random seed; returns both."""
    generator = torch.Generator(device=device)
    if seed is None:
        seed = generator.seed()
    generator.manual_seed(seed)
    return generator, seed


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    length: int,
    num_samples: int = 1,
    decoding: Decoding = Decoding(),
    generator: torch.Generator | None = None,
    on_step: Callable[[torch.Tensor], None] | None = None,
    stop_id: int | None = None,
) -> torch.Tensor:
    """Continue a prompt (ids [P], P >= 1) by `length` ids in `num_samples` parallel samples.

    The prompt is read once (in chunks of PROMPT_CHUNK) to warm up the state, which is then
    cached: each new id costs one step. `on_step` receives each new column of ids [N] as soon as it is drawn (for streaming).
    With `stop_id`, generation ends once every sample has drawn it (each sample's text ends
    at its first stop_id). Returns the generated ids [N, length'] (without the prompt)."""
    assert length >= 1, "length must be at least 1"
    assert prompt_ids.numel() >= 1, "generation needs a prompt of at least one character"
    was_training = model.training
    model.eval()
    try:
        return _generate(model, prompt_ids, length, num_samples, decoding, generator, on_step, stop_id)
    finally:
        model.train(was_training)


# Characters of a prompt per model call. `charlm serve` reads a long prompt in these chunks
# between the steps of the requests already streaming (so none of them stalls for the whole
# prompt), and generate() reads prompts in the same chunks, so the two give the same samples.
PROMPT_CHUNK = 256


def read_prompt_chunk(
    model: torch.nn.Module, ids: torch.Tensor, read: int, state: tuple | None
) -> tuple[torch.Tensor, tuple, int]:
    """Read the next chunk of prompts ids [G, P] from position `read` (state carried): the chunk's
    last logits [G, V], the state after it, and the position reached."""
    logits, state = model(ids[:, read : read + PROMPT_CHUNK], state)  # [G, C, V]
    return logits[:, -1], state, min(ids.shape[1], read + PROMPT_CHUNK)


def read_prompt(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """Read prompts ids [G, P] (P >= 1) chunk by chunk: the last position's logits [G, V] and the state."""
    read, state = 0, None
    while read < ids.shape[1]:
        logits, state, read = read_prompt_chunk(model, ids, read, state)
    assert state is not None, "a prompt is at least one id long"
    return logits, state


def _generate(model, prompt_ids, length, num_samples, decoding, generator, on_step, stop_id):
    device = next(model.parameters()).device
    logits, state = read_prompt(model, prompt_ids.to(device).long()[None])  # [1, V]
    logits = logits.expand(num_samples, -1)  # [N, V]
    state = tuple(s.repeat(1, num_samples, 1) for s in state)  # each [L, N, H]
    out = torch.empty(num_samples, length, dtype=torch.long)
    finished = torch.zeros(num_samples, dtype=torch.bool)
    for t in range(length):
        nxt = pick_next(logits, decoding, generator)  # [N]
        out[:, t] = nxt.cpu()
        if on_step is not None:
            on_step(out[:, t])
        if stop_id is not None:
            finished |= out[:, t] == stop_id
            if bool(finished.all()):
                return out[:, : t + 1]
        if t + 1 < length:
            logits, state = model(nxt[:, None], state)  # [N, 1, V]
            logits = logits[:, -1]
    return out
