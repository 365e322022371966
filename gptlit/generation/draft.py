"""Drafted decoding: guessed tokens from the text itself (prompt lookup) and from a corpus's n-grams, checked in
one forward pass.

At batch 1 a decoding step is bound by reading the weights, not by arithmetic: checking eight guessed
tokens in one forward pass costs little more than producing one. Stories repeat names and phrases, and
greedy decoding repeats itself more, so the tokens that followed the last occurrence of the current
n-gram are good guesses. Where the text has no such n-gram yet (early in a story), the most frequent
continuations in a corpus (`NgramTable`) are the next best guess: the training data's, or better, the
model's own greedy continuations of training-story openings. `drafted_stream` keeps the guesses that equal the
token the model's logits pick at their position, greedy or sampled (a sample is a pure function of the logits
and the position, `gptlit.generation.sampling`), so the output is the plain loop's output either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gptlit.data.store import offsets_path, training_tokens
from gptlit.errors import UsageError
from gptlit.generation.decoding import CachedDecoding, CausalLM, SamplingOptions, collect, sample_stream
from gptlit.generation.sampling import TokenPicker, random_seed


class NgramTable:
    """The most frequent token after each n-gram (n = ``min_ngram``..``max_ngram``) of a token corpus.

    Args:
        tokens: The corpus as token ids (1-D).
        vocab_size: Ids are below this.
        max_ngram: Longest context to look up.
        min_ngram: Shortest context: a continuation stops where only a shorter one was ever seen.
        min_count: Keep an n-gram only if its most frequent next token followed it this often: a context
            seen once predicts worse than a shorter one seen many times.
        source: Where the tokens come from, in words (``sample`` names it beside its speed).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        vocab_size: int,
        max_ngram: int = 3,
        min_ngram: int = 2,
        min_count: int = 2,
        source: str = "a token corpus",
    ) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise UsageError(f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, max_ngram={max_ngram}")
        if vocab_size ** (max_ngram + 1) >= 2**63:
            raise UsageError(f"an n-gram of {max_ngram} + 1 ids of a {vocab_size}-token vocabulary overflows int64 "
                             "keys: use a smaller max_ngram")  # fmt: skip
        self.vocab_size, self.sizes = vocab_size, range(max_ngram, min_ngram - 1, -1)
        self.source = source
        ids = np.asarray(tokens, dtype=np.int64)
        if len(ids) and not 0 <= ids.min() <= ids.max() < vocab_size:
            raise UsageError(f"token ids must be in [0, {vocab_size}), got {ids.min()}..{ids.max()}")
        # n -> {n-gram as one int (base vocab_size): the token that most often followed it}
        self.next: dict[int, dict[int, int]] = {}
        for n in self.sizes:
            count = max(len(ids) - n, 0)  # n-grams that have a next token
            key = np.zeros(count, dtype=np.int64)
            for j in range(n):
                key = key * vocab_size + ids[j : j + count]
            pairs, counts = np.unique(key * vocab_size + ids[n:], return_counts=True)  # (n-gram, next) pairs
            keys, nexts = pairs // vocab_size, pairs % vocab_size
            order = np.lexsort((-counts, keys))  # by n-gram, the most frequent next first (ties: smaller id)
            keys, nexts, counts = keys[order], nexts[order], counts[order]
            best = np.ones(len(keys), dtype=bool)
            best[1:] = keys[1:] != keys[:-1]  # the first row of each n-gram
            best &= counts >= min_count
            self.next[n] = dict(zip(keys[best].tolist(), nexts[best].tolist(), strict=True))

    @classmethod
    def from_data_dir(
        cls, data_dir: str | Path, max_tokens: int = 2_000_000, tokenizer_sha256: str | None = None, **kwargs
    ) -> NgramTable:
        """The table of the first ``max_tokens`` tokens of a prepared directory's ``train.bin``.

        With ``tokenizer_sha256`` (`Tokenizer.sha256` of the model's tokenizer), a directory tokenized by
        another tokenizer is refused: its ids would name other tokens.
        """
        tokens, vocab_size = training_tokens(data_dir, tokenizer_sha256)
        return cls(tokens[:max_tokens], vocab_size, source=str(data_dir), **kwargs)

    @classmethod
    def from_model(
        cls,
        model: CausalLM,
        data_dir: str | Path,
        stories: int = 256,
        prompt_tokens: int = 16,
        max_new_tokens: int = 128,
        eos_id: int | None = None,
        batch_size: int = 8,
        tokenizer_sha256: str | None = None,
        compile: bool = False,
        **kwargs,
    ) -> NgramTable:
        """The table of the model's own greedy continuations of the openings of ``stories`` training stories.

        Greedy decoding keeps to the phrasings the model settled on, so its own output predicts its next
        output better than the training text does (more tokens per pass than `from_data_dir`'s table, for the
        decoding of 256 stories, in batches of 8, to build it; figures in `benchmarks/README.md`).

        Args:
            model: The model whose greedy decoding the table will draft for.
            data_dir: Its prepared data directory: the openings are the first ``prompt_tokens`` tokens
                of the first ``stories`` stories of ``train.bin``.
            max_new_tokens: Tokens decoded after each opening.
            eos_id: Stop a continuation at this id, as the decoding the table will serve does.
            batch_size: Openings decoded together. With ``compile``, a last, smaller batch compiles once more.
            tokenizer_sha256: As in `from_data_dir`: refuse a directory of another tokenizer.
            compile: Decode with ``torch.compile`` (see `gptlit.generation.generate.generate`).
            kwargs: ``max_ngram``, ``min_ngram`` and ``min_count`` of the table.
        """
        if min(stories, prompt_tokens, batch_size) < 1:
            raise UsageError(
                f"stories, prompt_tokens and batch_size must be >= 1, got {stories}, {prompt_tokens} and {batch_size}"
            )
        train, _ = training_tokens(data_dir, tokenizer_sha256)
        offsets = np.load(offsets_path(data_dir, "train"), mmap_mode="r")[: stories + 1].tolist()
        starts, ends = offsets[:stories], [*offsets[1:], len(train)][:stories]  # a story ends where the next starts
        openings = [train[a : min(a + prompt_tokens, b)].tolist() for a, b in zip(starts, ends, strict=True)]
        tokens: list[int] = []
        options = SamplingOptions(max_new_tokens, temperature=0, compile=compile)
        for i in range(0, len(openings), batch_size):
            batch = openings[i : i + batch_size]
            stream = sample_stream(model, batch, options, eos_id)
            for opening, new in zip(batch, collect(stream, len(batch)), strict=True):
                tokens += opening + new
        source = f"the model's greedy stories from {data_dir}"
        return cls(np.array(tokens, dtype=np.int64), model.config.vocab_size, source=source, **kwargs)

    def continuation(self, context: list[int], limit: int) -> list[int]:
        """Up to ``limit`` tokens after ``context``, each the most frequent one after the longest known n-gram."""
        seq, out = list(context[-self.sizes[0] :]), []
        while len(out) < limit:
            token = next((t for n in self.sizes if (t := self._after(seq, n)) is not None), None)
            if token is None:
                break
            out.append(token)
            seq.append(token)
        return out

    def _after(self, seq: list[int], n: int) -> int | None:
        """The most frequent token after the last n tokens of seq, or None."""
        if len(seq) < n:
            return None
        key = 0
        for token in seq[-n:]:
            key = key * self.vocab_size + token
        return self.next[n].get(key)


class NgramDraft:
    """Proposes what followed the latest earlier occurrence of the sequence's last n tokens.

    Args:
        tokens: The sequence so far (the prompt).
        max_ngram: Longest n-gram to match; shorter ones down to ``min_ngram`` are tried when it has no match.
        min_ngram: Shortest n-gram to match.
        table: Continuations from a corpus, proposed when the text has no match of two tokens or more.
    """

    def __init__(
        self, tokens: list[int], max_ngram: int = 3, min_ngram: int = 1, table: NgramTable | None = None
    ) -> None:
        self.sizes, self.table = range(max_ngram, min_ngram - 1, -1), table
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
        """``limit`` tokens that may come next; none when the last n-gram was never seen before.

        The text's own matches of two tokens or more come first, then the table's continuation, then a
        one-token match in the text.
        """
        if limit <= 0:
            return []
        for n in self.sizes:
            if n >= 2 and (guess := self._repeat(n, limit)):
                return guess
        if self.table is not None and (guess := self.table.continuation(self.tokens, limit)):
            return guess
        return self._repeat(1, limit) if 1 in self.sizes else []

    def _repeat(self, n: int, limit: int) -> list[int]:
        """What followed the latest earlier occurrence of the last n tokens, or nothing."""
        start = self.follower[n].get(tuple(self.tokens[-n:])) if len(self.tokens) >= n else None
        if start is None:
            return []
        # The text since that occurrence, repeated: a loop of period p gets guesses past its end.
        period = len(self.tokens) - start
        return [self.tokens[start + i % period] for i in range(limit)]


def drafted_stream(
    model: CausalLM,
    prompt: list[int],
    options: SamplingOptions,
    eos_id: int | None = None,
    table: NgramTable | None = None,
) -> Iterator[dict[int, int]]:
    """Decoding of one prompt, checking up to ``options.draft_tokens`` guessed tokens (`NgramDraft`) in the
    forward pass of each token; yields ``{0: token}`` for each new token, as `decoding.sample_stream` does, and
    the same tokens: greedy, or sampled with the same seed.

    The pass of a token and its guesses gives the logits at each of their positions, and so the token the plain
    loop would pick there (`TokenPicker`): the guesses equal to it are confirmed, in the cache already, and the
    pick after the last of them comes free.
    """
    seq, drafts = list(prompt), NgramDraft(prompt, table=table)
    seed = random_seed() if options.seed is None else options.seed
    pick = TokenPicker(options.temperature, options.top_k, options.top_p, seed, row=0)
    new_count, max_new_tokens = 0, options.max_new_tokens
    limit = options.draft_tokens  # guesses per pass: sampling adapts it to how many pass (`_next_limit`)
    with CachedDecoding(model, 1, options.compile) as decoding:
        cur = len(seq)  # tokens known; the cache holds tokens [start:cur] at positions 0..
        start = decoding.window_start(cur)
        ready = pick(decoding.prefill([seq], start, cur), cur)  # the next tokens, known, not in the cache yet
        while True:
            for token in ready:
                seq.append(token)
                drafts.append(token)
                if token == eos_id:
                    return
                yield {0: token}
                new_count += 1
                if new_count == max_new_tokens:
                    return
            cur = len(seq)  # the cache holds tokens [start:cur - 1]: the last one is fed next
            if cur - start > decoding.window:  # no room for token cur - 1: slide the window
                start = decoding.window_start(cur)
                ready = pick(decoding.prefill([seq], start, cur), cur)
                continue
            # Guesses must fit in the window; past the tokens still wanted they would only cost time.
            room = min(limit, decoding.window - (cur - start), max_new_tokens - new_count - 1)
            guess = drafts.propose(room)
            logits = decoding.run([[seq[cur - 1], *guess]], cur - 1 - start)[0]  # (1 + len(guess), V)
            # Keys and values of rejected guesses stay in the cache past the accepted positions: no query attends
            # to a position after its own, and the next tokens fed overwrite them.
            ready = pick.check(logits, cur, guess)  # the confirmed guesses, and the pick after the last of them
            if options.temperature > 0 and guess:
                limit = _next_limit(limit, len(ready) - 1, len(guess), options.draft_tokens)


def _next_limit(limit: int, accepted: int, guessed: int, most: int) -> int:
    """Guesses for the next pass of sampled decoding: twice as many after a pass that confirmed all of its guesses,
    one more than it confirmed after one that did not. A sampled token often differs from what the text so far
    suggests, and a pass that checks guesses costs more the more it checks: where few pass, few are fed."""
    return min(most, 2 * limit) if accepted == guessed else max(1, accepted + 1)
