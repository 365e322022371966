"""Picking the next token from logits: greedy, or a sample after temperature, top-k and nucleus (top-p).

A sample is drawn by inverse transform: one uniform number ``u`` per position, and the token whose slice of the
cumulative distribution (over the kept tokens, in vocabulary order) holds ``u``. The number comes from a
counter-based generator keyed by (seed, row, position in the sequence) (`token_uniforms`), so the token at a
position is a pure function of the logits there: decoding that checks several guessed tokens in one forward pass
(`gptlit.generation.draft`) picks exactly the token the one-token-per-pass loop picks, and a row samples the same
tokens whatever the rows beside it. Each token is an exact draw from the filtered softmax: P(token = v) is v's
share of the kept probability mass.

Vocabulary order, not the order of probability, makes the pick robust to rounding: logits that differ in their
last bits (a pass of several tokens against a pass of one) move each slice's edges by as little, so the pick
changes only when ``u`` falls within rounding of an edge, as rarely as a near-tie flips greedy's arg-max.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Sequence

import torch

_MASK = 2**64 - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix(x: int) -> int:
    """A 64-bit integer to a well-spread 64-bit integer (SplitMix64's finalizer after its increment)."""
    x = (x + _GOLDEN) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def uniform_numbers(seed: int, keys: Iterable[tuple[int, int]]) -> list[float]:
    """The uniform numbers in [0, 1) that pick the tokens at ``keys``, pairs (row, position: the token's index in
    its row's sequence, prompt included), under ``seed``: a hash of the three, so any position's number is had
    directly, in any order."""
    seed = _mix(seed & _MASK)
    return [(_mix(_mix(seed ^ row) ^ pos) >> 11) * 2.0**-53 for row, pos in keys]


def token_uniforms(seed: int, keys: Iterable[tuple[int, int]]) -> torch.Tensor:
    """`uniform_numbers` as a tensor (len(keys),) float64."""
    return torch.tensor(uniform_numbers(seed, keys), dtype=torch.float64)


def random_seed() -> int:
    """A seed drawn from torch's global generator: a decoding without a seed follows ``torch.manual_seed``."""
    return int(torch.randint(2**62, ()))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token id of each row of logits (..., V), the first on a tie: ``argmax(dim=-1)``.

    ``max(dim=-1).indices`` is the same index, and on a CPU faster than ``argmax`` over several rows.
    """
    return logits.max(dim=-1).indices


def pick_tokens(
    logits: torch.Tensor,
    uniforms: torch.Tensor | None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """The token of each row of logits (N, V) that its uniform number (N,) picks after temperature, top-k and
    top-p (see the module's docstring); temperature 0 is greedy and ignores the numbers. Returns (N,)."""
    if temperature == 0:
        return greedy(logits)
    picks = pick_ids(logits, uniforms.tolist(), temperature, top_k, top_p)
    return torch.tensor(picks, dtype=torch.long, device=logits.device)


def pick_ids(
    logits: torch.Tensor,
    uniforms: Sequence[float],
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> list[int]:
    """`pick_tokens` as a list of ids, from the uniform numbers as floats (`uniform_numbers`).

    The filters and the cumulative distribution are tensor operations over all rows; the search for each row's
    number runs in Python over that row's few kept tokens. Right after a forward pass each tensor operation costs
    several microseconds (a decoding pass leaves the CPU's caches cold), so this is fewer of them.
    """
    if temperature == 0:
        return greedy(logits).tolist()
    vocab_size = logits.size(-1)
    k = vocab_size if top_k is None else min(top_k, vocab_size)
    if top_p is not None and top_p < 1.0:
        scores, ids = _nucleus(logits.float() / temperature, k, top_p)
    elif k < vocab_size:
        scores, ids = torch.topk(logits, k, dim=-1)  # (N, k), most likely first
        scores = scores.float() / temperature
    else:
        scores, ids = logits.float() / temperature, None
    if ids is not None:
        ids, order = ids.sort(dim=-1)  # back to vocabulary order
        scores = scores.gather(-1, order)
    cdf = scores.double().softmax(dim=-1).cumsum(dim=-1)  # (N, K)
    picks = []
    for u, row in zip(uniforms, cdf.tolist(), strict=True):
        total = row[-1]  # 1 up to rounding
        # Strictly below the total, so that the slice found is a kept token's (one of positive probability): the
        # first token whose slice ends above the target.
        picks.append(bisect_right(row, min(u * total, math.nextafter(total, 0.0))))
    return picks if ids is None else [row[i] for row, i in zip(ids.tolist(), picks, strict=True)]


def _nucleus(scores: torch.Tensor, k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores (N, K) of the top_k (k) most likely tokens, those past the top_p nucleus at -inf, and their ids.

    Without a top-k, the top 64 tokens (then 4x as many) are ranked first and the whole vocabulary only when a
    row's nucleus reaches past them: sorting every score costs far more than the few a nucleus usually holds.
    """
    vocab_size = scores.size(-1)
    if k < vocab_size:
        kept, ids = torch.topk(scores, k, dim=-1)  # (N, k), most likely first
        probs = kept.softmax(dim=-1)  # the nucleus of the top k's own softmax
    else:
        whole = scores.softmax(dim=-1)  # (N, V)
        width = min(64, vocab_size)
        while True:
            kept, ids = torch.topk(scores, width, dim=-1)  # (N, width), most likely first
            probs = whole.gather(-1, ids)
            if width == vocab_size or bool((probs.sum(dim=-1) > top_p).all()):  # every row's nucleus ends inside
                break
            width = min(4 * width, vocab_size)
    # Drop a token when the tokens ranked above it already hold top_p of the mass; the first always stays.
    return kept.masked_fill(probs.cumsum(dim=-1) - probs > top_p, float("-inf")), ids


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token id per row from logits (B, V) with uniform numbers from ``generator`` (the global one by
    default); temperature 0 is greedy. Returns (B,)."""
    if temperature == 0:
        return greedy(logits)
    uniforms = torch.rand(logits.size(0), generator=generator, dtype=torch.float64, device=logits.device)
    return pick_tokens(logits, uniforms, temperature, top_k, top_p)


class TokenPicker:
    """The tokens of one row of a decoding: `pick_ids` with the row's `uniform_numbers` under one seed.

    Args:
        temperature, top_k, top_p: As `pick_tokens`.
        seed: The decoding's seed (any integer; it is taken modulo 2**64).
        row: The row's index in the decoding: rows of one seed sample independently.
    """

    def __init__(self, temperature: float, top_k: int | None, top_p: float | None, seed: int, row: int) -> None:
        self.temperature, self.top_k, self.top_p, self.seed, self.row = temperature, top_k, top_p, seed, row

    def __call__(self, logits: torch.Tensor, first: int) -> list[int]:
        """The tokens at positions first, first + 1, ... that logits (N, V) predict, one per row."""
        uniforms = () if self.temperature == 0 else self.uniforms(first, logits.size(0))
        return pick_ids(logits, uniforms, self.temperature, self.top_k, self.top_p)

    def uniforms(self, first: int, count: int) -> list[float]:
        """The row's uniform numbers at positions first .. first + count - 1."""
        return uniform_numbers(self.seed, ((self.row, p) for p in range(first, first + count)))

    def check(self, logits: torch.Tensor, first: int, guess: list[int]) -> list[int]:
        """The guessed tokens at positions first, first + 1, ... that the logits (len(guess) + 1, V) confirm, and
        the token after the last of them: ``self(logits, first)`` up to its first token that differs from the
        guess. A sample is picked only where the guesses before it were confirmed (greedy picks every row at once:
        its pick costs less than a call)."""
        if self.temperature == 0:
            picks = self(logits, first)
            confirmed = next((i for i, (g, p) in enumerate(zip(guess, picks, strict=False)) if g != p), len(guess))
            return picks[: confirmed + 1]
        out: list[int] = []
        for i, token in enumerate(guess):
            out += self(logits[i : i + 1], first + i)
            if out[-1] != token:
                return out
        return out + self(logits[len(guess) :], first + len(guess))
