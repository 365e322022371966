"""Draft tokens for greedy decoding from the text itself (prompt lookup).

At batch 1 a decoding step is bound by reading the weights, not by arithmetic: checking eight guessed
tokens in one forward pass costs little more than producing one. Stories repeat names and phrases, and
greedy decoding repeats itself more, so the tokens that followed the last occurrence of the current
n-gram are good guesses. `gptlit.generate` keeps the guesses the model agrees with, so the output is
the greedy output either way.
"""

from __future__ import annotations


class NgramDraft:
    """Proposes what followed the latest earlier occurrence of the sequence's last n tokens.

    Args:
        tokens: The sequence so far (the prompt).
        max_ngram: Longest n-gram to match; shorter ones down to ``min_ngram`` are tried when it has no match.
        min_ngram: Shortest n-gram to match.
    """

    def __init__(self, tokens: list[int], max_ngram: int = 3, min_ngram: int = 1) -> None:
        self.sizes = range(max_ngram, min_ngram - 1, -1)
        self.tokens: list[int] = []
        # n -> {n-gram: index in tokens of the token that followed its latest occurrence}
        self.follower: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        """Add the next token of the sequence."""
        self.tokens.append(token)
        last = len(self.tokens) - 1
        for n in self.sizes:
            if last >= n:
                self.follower[n][tuple(self.tokens[last - n : last])] = last

    def propose(self, limit: int) -> list[int]:
        """``limit`` tokens that may come next; none when the last n-gram was never seen before."""
        if limit <= 0:
            return []
        for n in self.sizes:
            if len(self.tokens) >= n:
                start = self.follower[n].get(tuple(self.tokens[-n:]))
                if start is not None:
                    # The text since that occurrence, repeated: a loop of period p gets guesses past its end.
                    period = len(self.tokens) - start
                    return [self.tokens[start + i % period] for i in range(limit)]
        return []
