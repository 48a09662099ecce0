"""The sampler: pick_next rules and the state-caching generation loop."""

from __future__ import annotations

import torch

from charlm.config import ModelConfig
from charlm.inference.sample import Decoding, generate, make_generator, pick_next, prompt_context
from charlm.models.model import CharLM


def rows(n=6, V=20, seed=0):
    torch.manual_seed(seed)
    return torch.randn(n, V) * 3


def test_temperature_zero_is_argmax():
    logits = rows()
    assert torch.equal(pick_next(logits, Decoding(temperature=0)), logits.argmax(-1))


def test_top_k_one_is_argmax():
    logits = rows()
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        assert torch.equal(pick_next(logits, Decoding(1.0, top_k=1), gen), logits.argmax(-1))


def test_top_k_never_draws_outside_the_k_most_likely():
    logits = rows(n=4)
    allowed = logits.topk(3, dim=-1).indices
    gen = torch.Generator().manual_seed(2)
    for _ in range(300):
        drawn = pick_next(logits, Decoding(2.0, top_k=3), gen)  # hot: would often stray without top-k
        assert all(drawn[r] in allowed[r] for r in range(4))


def test_top_p_never_draws_outside_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.05, 0.1, 0.8]]))
    # p = 0.7: row 0's nucleus is {0, 1} (0.5 < 0.7 <= 0.8); row 1's is {3} alone.
    gen = torch.Generator().manual_seed(3)
    seen = [set(), set()]
    for _ in range(300):
        drawn = pick_next(logits, Decoding(1.0, top_p=0.7), gen)
        seen[0].add(int(drawn[0]))
        seen[1].add(int(drawn[1]))
    assert seen == [{0, 1}, {3}]


def test_top_p_one_keeps_everything():
    logits = torch.zeros(1, 4)
    gen = torch.Generator().manual_seed(4)
    seen = {int(pick_next(logits, Decoding(1.0, top_p=1.0), gen)) for _ in range(200)}
    assert seen == {0, 1, 2, 3}


def test_same_seed_same_draws():
    logits = rows()
    a = [pick_next(logits, Decoding(1.0), make_generator(torch.device("cpu"), 7)[0]) for _ in range(3)]
    b = [pick_next(logits, Decoding(1.0), make_generator(torch.device("cpu"), 7)[0]) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert make_generator(torch.device("cpu"), None)[1] is not None  # a fresh seed is reported


def model():
    torch.manual_seed(0)
    return CharLM(ModelConfig(type="lstm", hidden_size=8, num_layers=2), 9, "native").eval()


def test_cached_state_generation_equals_rerunning_the_whole_text():
    m = model()
    prompt = torch.tensor([1, 2, 3])
    out = generate(m, prompt, length=12, decoding=Decoding(temperature=0))
    text = prompt.tolist()
    for _ in range(12):  # greedy, re-running everything each time: slow but obviously right
        logits, _ = m(torch.tensor([text]))
        text.append(int(logits[0, -1].argmax()))
    assert out[0].tolist() == text[3:]


def test_batched_samples_are_independent_and_seeded():
    m = model()
    prompt = torch.tensor([4])
    a = generate(m, prompt, 30, num_samples=5, generator=make_generator(torch.device("cpu"), 11)[0])
    b = generate(m, prompt, 30, num_samples=5, generator=make_generator(torch.device("cpu"), 11)[0])
    assert a.shape == (5, 30) and torch.equal(a, b)
    assert len({tuple(r) for r in a.tolist()}) > 1


def test_streaming_callback_sees_every_column():
    seen = []
    out = generate(
        model(),
        torch.tensor([0]),
        8,
        on_step=lambda ids: seen.append(int(ids[0])),
        generator=make_generator(torch.device("cpu"), 0)[0],
    )
    assert seen == out[0].tolist()


def test_prompt_context_starts_on_a_new_line():
    assert prompt_context("ROMEO:", ["\n", "R"]) == "\nROMEO:"
    assert prompt_context("\nROMEO:", ["\n", "R"]) == "\nROMEO:"
    assert prompt_context("ROMEO:", ["R"]) == "ROMEO:"  # no newline in the vocabulary: as given


def test_inverse_cdf_gives_each_id_its_slice_of_the_unit_interval():
    from charlm.inference.sample import inverse_cdf

    probs = torch.tensor([[0.2, 0.3, 0.5]] * 6)
    u = torch.tensor([0.0, 0.1999, 0.2001, 0.4999, 0.5001, 0.9999], dtype=torch.float64)
    assert inverse_cdf(probs, u).tolist() == [0, 0, 1, 1, 2, 2]


def test_inverse_cdf_never_draws_an_id_of_probability_zero():
    from charlm.inference.sample import inverse_cdf

    probs = torch.tensor([[0.5, 0.0, 0.5, 0.0]] * 4)
    # 0.5 is where id 1's (empty) slice would be; 1.0 stands for u * total rounding up to the total.
    u = torch.tensor([0.4999, 0.5, 0.9999999, 1.0], dtype=torch.float64)
    assert inverse_cdf(probs, u).tolist() == [0, 2, 2, 2]


def test_draw_follows_the_distribution():
    from charlm.inference.sample import draw

    probs = torch.tensor([[0.1, 0.6, 0.0, 0.3]]).expand(20000, -1)
    counts = torch.bincount(draw(probs, torch.Generator().manual_seed(5)), minlength=4).double() / 20000
    expected = torch.tensor([0.1, 0.6, 0.0, 0.3], dtype=torch.float64)
    sigma = (expected * (1 - expected) / 20000).sqrt()
    assert counts[2] == 0
    assert torch.all((counts - expected).abs() <= 4 * sigma + 1e-12), counts
