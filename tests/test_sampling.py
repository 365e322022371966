"""The sampler's distribution: the tokens picked at many positions follow the softmax after temperature, top-k and
top-p, computed here independently; a sampler that ignores one of them fails the same check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gptlit.generation.sampling import TokenPicker, pick_tokens, token_uniforms

DRAWS = 40_000
# Four standard deviations of a frequency near 0.5 over DRAWS draws: a right sampler stays inside with a fixed seed.
TOLERANCE = 4 * (0.25 / DRAWS) ** 0.5
LOGITS = [2.0, 0.5, 1.5, -1.0, 0.0, 1.0, -0.5, 0.8]


def expected(logits: list[float], temperature: float, top_k: int | None, top_p: float | None) -> np.ndarray:
    """The filtered softmax, by its definition: the top_k most likely, then the smallest most-likely set whose
    probability reaches top_p, renormalised."""
    scores = np.array(logits, dtype=np.float64) / temperature
    order = np.argsort(-scores, kind="stable")
    keep = order[: top_k or len(scores)]
    probs = np.exp(scores[keep] - scores[keep].max())
    probs /= probs.sum()
    if top_p is not None:
        before = np.cumsum(probs) - probs  # mass of the tokens ranked above each
        keep, probs = keep[before <= top_p], probs[before <= top_p]
    out = np.zeros(len(scores))
    out[keep] = probs / probs.sum()
    return out


def frequencies(temperature: float, top_k: int | None, top_p: float | None, seed: int = 0) -> np.ndarray:
    """How often each token is picked at DRAWS positions of one row, through the decoding's own picker."""
    logits = torch.tensor(LOGITS).expand(DRAWS, -1)
    tokens = TokenPicker(temperature, top_k, top_p, seed, row=0)(logits, first=100)
    return np.bincount(tokens, minlength=len(LOGITS)) / DRAWS


SETTINGS = [(1.0, None, None), (0.5, None, None), (2.0, None, None), (1.0, 4, None), (0.8, None, 0.7), (1.5, 5, 0.8)]


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), SETTINGS)
def test_picked_tokens_follow_the_filtered_softmax(temperature, top_k, top_p):
    want = expected(LOGITS, temperature, top_k, top_p)
    got = frequencies(temperature, top_k, top_p)
    assert np.abs(got - want).max() < TOLERANCE, (got.round(4), want.round(4))
    assert (got[want == 0] == 0).all()  # a filtered-out token is never picked
    # The check tells a sampler that ignores one of the settings: each would be off by several tolerances.
    wrong = [expected(LOGITS, 1.0 if temperature != 1.0 else 0.5, top_k, top_p)]
    wrong += [expected(LOGITS, temperature, None, top_p)] if top_k else []
    wrong += [expected(LOGITS, temperature, top_k, None)] if top_p else []
    assert all(np.abs(w - want).max() > 3 * TOLERANCE for w in wrong)


def test_rows_and_seeds_sample_independently():
    # Two rows (or two seeds) at the same positions: their tokens agree as often as independent draws do.
    logits = torch.zeros(DRAWS, 4)  # uniform over 4 tokens: independent draws agree a quarter of the time
    row0 = TokenPicker(1.0, None, None, seed=7, row=0)(logits, first=0)
    row1 = TokenPicker(1.0, None, None, seed=7, row=1)(logits, first=0)
    seed8 = TokenPicker(1.0, None, None, seed=8, row=0)(logits, first=0)
    for other in (row1, seed8):
        agree = np.mean(np.array(row0) == np.array(other))
        assert abs(agree - 0.25) < TOLERANCE
    # Neighbouring positions of one row too (the token at p against the token at p + 1).
    assert abs(np.mean(np.array(row0[1:]) == np.array(row0[:-1])) - 0.25) < TOLERANCE


def test_uniform_numbers_are_uniform_and_a_function_of_their_key():
    keys = [(row, pos) for row in range(4) for pos in range(DRAWS // 4)]
    u = token_uniforms(123, keys).numpy()
    assert ((u >= 0) & (u < 1)).all()
    counts = np.histogram(u, bins=10, range=(0, 1))[0] / len(u)
    assert np.abs(counts - 0.1).max() < TOLERANCE
    assert torch.equal(token_uniforms(123, keys[::-1]), token_uniforms(123, keys).flip(0))  # order-free


def test_a_kept_token_is_picked_whatever_the_number():
    # u at its extremes picks the first and the last kept token in vocabulary order, never a filtered one.
    logits = torch.tensor([[0.0, 5.0, -1.0, 4.0, 3.0]])
    for u, token in [(0.0, 1), (1 - 2**-53, 4)]:
        assert pick_tokens(logits, torch.tensor([u], dtype=torch.float64), 1.0, top_k=3).item() == token


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(0.0, None, None), (0.8, 40, None), (1.0, None, 0.9)])
def test_checking_guesses_stops_at_the_first_pick_that_differs(temperature, top_k, top_p):
    # check() against picking every row and cutting after the first miss; guesses that are the picks themselves
    # up to a random point, then random tokens.
    gen = torch.Generator().manual_seed(0)
    picker = TokenPicker(temperature, top_k, top_p, seed=5, row=0)
    for trial in range(50):
        logits = torch.randn(9, 500, generator=gen) * 3
        picks = picker(logits, first=trial)
        right = int(torch.randint(9, (), generator=gen))
        guess = picks[:right] + torch.randint(500, (8 - right,), generator=gen).tolist()
        miss = next((i for i, (g, p) in enumerate(zip(guess, picks, strict=False)) if g != p), 8)
        assert picker.check(logits, trial, guess) == picks[: miss + 1]


def test_the_nucleus_of_the_whole_vocabulary_is_found_past_the_first_tokens_ranked():
    # A flat distribution over 1,000 tokens: the top-p nucleus holds far more than the 64 ranked first.
    logits = torch.zeros(4000, 1000)
    logits[:, :10] = 1.0  # ten tokens a little more likely, then 990 alike
    tokens = np.array(TokenPicker(1.0, None, 0.5, seed=3, row=0)(logits, first=0))
    probs = np.full(1000, 1.0)
    probs[:10] = np.e
    probs /= probs.sum()
    kept = int(np.searchsorted(np.cumsum(np.sort(probs)[::-1]) - np.sort(probs)[::-1], 0.5, side="right"))
    assert kept > 400  # the nucleus: the 10 likelier tokens and some 400+ of the rest
    assert len(np.unique(tokens)) > 300 and np.isin(np.arange(10), tokens).all()
