"""Drafted decoding (prompt lookup, n-gram tables): the tokens of one token per pass, greedy or sampled, in fewer
forward passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import ARCHITECTURES, CountingForward, expected_passes, prompt, reference_generate, tiny_model

from gptlit.generation.draft import NgramDraft, NgramTable
from gptlit.generation.generate import generate
from gptlit.model.gpt import GPT


def test_proposes_what_followed_the_latest_occurrence():
    draft = NgramDraft([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 1, 2])
    # "1 2" was followed by 3 twice; the latest occurrence (index 5) goes on with 3 7 8.
    assert draft.propose(3) == [3, 7, 8]
    assert draft.propose(7) == [3, 7, 8, 1, 2, 3, 7]  # past the end: the text since that occurrence, repeated
    draft.append(3)
    assert draft.propose(2) == [7, 8]  # "1 2 3" matched at index 5


def test_longer_ngram_wins_over_a_later_shorter_one():
    draft = NgramDraft([4, 5, 6, 40, 9, 6, 50, 4, 5, 6])
    assert draft.propose(1) == [40]  # "4 5 6" -> 40, although "6" was last followed by 50


def test_nothing_to_propose():
    assert NgramDraft([1, 2, 3]).propose(4) == []
    assert NgramDraft([]).propose(4) == []
    assert NgramDraft([1, 1]).propose(0) == []
    assert NgramDraft([1, 2, 3, 1]).propose(4) == [2, 3, 1, 2]
    assert NgramDraft([5, 5]).propose(3) == [5, 5, 5]  # a token repeating itself


@pytest.mark.parametrize("seed", range(4))
def test_each_pass_yields_its_accepted_guesses_and_one_token_more(seed, monkeypatch):
    model = tiny_model(block_size=64, seed=seed)
    ids = prompt(5, seed=seed) * 3
    plain = generate(model, ids, 40, temperature=0, draft_tokens=0)[0]
    counter = CountingForward(model, monkeypatch)
    assert generate(model, ids, 40, temperature=0)[0] == plain
    assert counter.calls - 1 == expected_passes(ids, plain, 8, 64) < 39


@ARCHITECTURES
@pytest.mark.parametrize(("length", "new", "block_size"), [(4, 28, 32), (6, 90, 16)])
def test_drafted_greedy_equals_plain_greedy_in_fewer_passes(arch, length, new, block_size, monkeypatch):
    # The second case slides the window 8 times with drafts in flight.
    model = tiny_model(block_size=block_size, **arch)
    saved = 0
    for seed in range(4):
        ids = prompt(length, seed=seed) * 3  # a prompt that repeats itself gives the drafts something to find
        plain = generate(model, ids, new, temperature=0, draft_tokens=0)
        counter = CountingForward(model, monkeypatch)
        drafted = generate(model, ids, new, temperature=0, draft_tokens=8)
        monkeypatch.undo()
        assert drafted == plain
        if len(ids) + new <= block_size:
            assert drafted == [reference_generate(model, ids, new)]
        assert max(counter.fed) <= 9  # at most 8 guesses with each token
        saved += new - counter.calls
    assert saved > 0, "no drafted token was ever confirmed"


def test_one_token_per_pass_without_drafts(monkeypatch):
    model = tiny_model()
    counter = CountingForward(model, monkeypatch)
    generate(model, prompt(5) * 2, 12, temperature=0, draft_tokens=0)
    assert counter.calls == 12 and counter.fed == [1] * 11  # the prompt, then each new token but the last


# Settings of sampling, each with the seed it is tried with: temperatures, top-k, top-p and both.
SAMPLINGS = [
    dict(temperature=0.5, seed=0),
    dict(temperature=0.8, top_k=5, seed=1),
    dict(temperature=1.0, top_p=0.9, seed=2),
    dict(temperature=0.7, top_k=8, top_p=0.8, seed=2**64 - 1),
    dict(temperature=1.3, seed=-5),
]


@ARCHITECTURES
@pytest.mark.parametrize(("length", "new", "block_size"), [(4, 28, 32), (6, 90, 16)])
def test_drafted_sampling_writes_the_tokens_of_plain_sampling(arch, length, new, block_size, monkeypatch):
    # The same seed, the same tokens, in fewer passes; the second case slides the window 8 times.
    model = tiny_model(block_size=block_size, **arch)
    saved = 0
    for i, sampling in enumerate(SAMPLINGS):
        ids = prompt(length, seed=i) * 3
        plain = generate(model, ids, new, draft_tokens=0, **sampling)
        counter = CountingForward(model, monkeypatch)
        drafted = generate(model, ids, new, **sampling)
        monkeypatch.undo()
        assert drafted == plain, sampling
        if len(ids) + new <= block_size:
            assert plain == [reference_generate(model, ids, new, **sampling)]
        assert max(counter.fed) <= 9
        saved += new - counter.calls
    assert saved > 0, "no drafted token was ever confirmed"


@pytest.mark.parametrize("seed", range(6))
def test_drafted_sampling_with_a_table_and_many_seeds(seed):
    model = tiny_model(block_size=64, seed=seed % 3)
    ids = prompt(5, seed=seed) * 2
    table = NgramTable(np.array(prompt(300, seed=seed) * 2), vocab_size=model.config.vocab_size)
    for sampling in SAMPLINGS:
        sampling = {**sampling, "seed": sampling["seed"] ^ seed}
        plain = generate(model, ids, 40, draft_tokens=0, **sampling)
        assert generate(model, ids, 40, draft_table=table, **sampling) == plain
        assert generate(model, ids, 40, draft_tokens=3, **sampling) == plain
        assert model.generate(torch.tensor(ids), 40, **sampling)[0, len(ids) :].tolist() == plain[0]


def test_a_seed_and_its_row_give_the_same_tokens_alone_or_in_a_batch():
    # Row i of a batch samples as with (seed, row i): the batch of one prompt twice writes two stories, and each
    # is the story the plain loop writes for it.
    model = tiny_model(block_size=64)
    ids = prompt(6, seed=3)
    batch = generate(model, [ids, ids], 30, temperature=1.0, seed=9)
    assert batch[0] == generate(model, ids, 30, temperature=1.0, seed=9)[0]
    assert batch[0] != batch[1]


def test_no_drafts_for_batches(monkeypatch):
    model = tiny_model()
    counter = CountingForward(model, monkeypatch)
    generate(model, [prompt(5) * 2, prompt(5) * 2], 12, temperature=0)
    generate(model, [prompt(5) * 2, prompt(5) * 2], 12, temperature=1.0, seed=0)
    assert counter.calls == 24 and counter.fed == [1] * 22


def test_eos_among_accepted_guesses_stops_there(monkeypatch):
    model = tiny_model(block_size=64, seed=0)
    ids = [28, 73, 48, 17, 17, 17, 17, 24, 27, 67, 17, 42, 42, 42, 42, 16, 67, 67, 67, 67, 16, 67, 67, 67, 67]
    ids += [67, 67, 65, 16, 16, 67, 67, 67]
    plain = generate(model, ids, 20, temperature=0, draft_tokens=0)[0]
    assert plain[:2] == [65, 16]
    counter = CountingForward(model, monkeypatch)
    assert generate(model, ids, 20, temperature=0)[0] == plain
    assert counter.fed[0] > 1 and counter.calls - 1 < 19  # 16 after 65 arrives as an accepted guess
    assert generate(model, ids, 20, temperature=0, eos_id=16) == [[65]]


@pytest.mark.parametrize("new", [1, 2, 7, 9, 10])
def test_exactly_max_new_tokens(new):
    model = tiny_model()
    ids = prompt(3, seed=2) * 4
    out = generate(model, ids, new, temperature=0)[0]
    assert out == generate(model, ids, new, temperature=0, draft_tokens=0)[0] and len(out) == new


def test_streamed_tokens_arrive_one_by_one_in_order():
    model = tiny_model()
    ids = prompt(4, seed=3) * 3
    seen: list[int] = []
    out = generate(model, ids, 25, temperature=0, on_token=lambda i, t: seen.append(t))
    assert seen == out[0]
    assert torch.equal(model.generate(torch.tensor(ids), 25, temperature=0)[0, len(ids) :], torch.tensor(out[0]))


def test_corpus_table_gives_more_tokens_per_pass_and_the_same_tokens(monkeypatch):
    model = tiny_model(block_size=64, seed=1)
    ids = prompt(6, seed=5)
    plain = generate(model, ids, 40, temperature=0, draft_tokens=0)[0]
    # A corpus holding this very continuation (twice: contexts seen once are dropped).
    table = NgramTable(np.array([*ids, *plain] * 2), vocab_size=model.config.vocab_size)
    counter = CountingForward(model, monkeypatch)
    assert generate(model, ids, 40, temperature=0, draft_table=table)[0] == plain
    passes = expected_passes(ids, plain, 8, 64, table)
    assert counter.calls - 1 == passes < expected_passes(ids, plain, 8, 64)
    counter.calls = 0  # the same through GPT.generate
    assert model.generate(torch.tensor(ids), 40, temperature=0, draft_table=table)[0, len(ids) :].tolist() == plain
    assert counter.calls - 1 == passes
    # A corpus of other text: wrong guesses, the same tokens.
    other = NgramTable(np.array(prompt(200, seed=9) * 2), vocab_size=model.config.vocab_size)
    assert generate(model, ids, 40, temperature=0, draft_table=other)[0] == plain


def test_corpus_table_of_a_larger_vocabulary_is_refused():
    model = tiny_model()
    ids, vocab = prompt(4), model.config.vocab_size
    plain = generate(model, ids, 5, temperature=0)
    # A tokenizer may have fewer ids than the model's (rounded-up) vocabulary: that table is fine.
    assert generate(model, ids, 5, temperature=0, draft_table=NgramTable(np.array([1, 2] * 3), vocab - 10)) == plain
    with pytest.raises(ValueError, match="draft_table"):
        generate(model, ids, 5, temperature=0, draft_table=NgramTable(np.array([1, 2, 3]), vocab + 1))


@pytest.mark.slow
def test_compiled_decoding_gives_the_same_tokens_without_falling_back_to_eager(monkeypatch):
    rope = tiny_model(block_size=16, seed=2)
    prompts = [prompt(5, seed=1) * 2, prompt(7, seed=2)]
    greedy = dict(temperature=0)
    cases = [
        (rope, [prompts[0]], greedy),  # drafted, batch 1, sliding the window
        (rope, prompts, greedy),  # a batch of two lengths
        (rope, prompts, dict(temperature=1.0, seed=3)),
        (rope, [prompts[0]], dict(temperature=0.8, top_k=10, seed=4)),  # drafted sampling
        (tiny_model(block_size=16, use_rope=False), [prompts[1]], greedy),  # another architecture
    ]
    for model, rows, options in cases:
        assert generate(model, rows, 30, compile=True, **options) == generate(model, rows, 30, **options)

    eager_passes = 0
    forward = GPT.forward

    def counting(self, *args, **kwargs):
        nonlocal eager_passes
        if not torch.compiler.is_compiling():
            eager_passes += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", counting)
    for model, rows, options in cases:  # compiled above: every pass runs a compiled graph now
        generate(model, rows, 30, compile=True, **options)
    assert eager_passes == 0
