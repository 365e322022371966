"""Corpus continuations for drafted decoding (gptlit.generation.draft.NgramTable); how NgramDraft falls back on them."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from helpers import CountingForward, expected_passes, tiny_model

from gptlit.data.sources import DataError
from gptlit.data.store import bin_path, offsets_path
from gptlit.generation.draft import NgramDraft, NgramTable
from gptlit.generation.generate import generate


def test_most_frequent_next_token_of_each_context():
    # After "1 2": 3 three times, 4 twice. After "2 3": 5 twice, 6 once.
    corpus = [1, 2, 3, 5, 1, 2, 4, 1, 2, 3, 5, 1, 2, 4, 1, 2, 3, 6]
    table = NgramTable(np.array(corpus), vocab_size=10, max_ngram=2, min_ngram=2)
    assert table.continuation([9, 1, 2], 1) == [3]
    assert table.continuation([2, 3], 1) == [5]
    assert table.continuation([1, 2], 3) == [3, 5, 1]  # chained: "2 3" -> 5, "3 5" -> 1


def test_ties_go_to_the_smaller_id():
    table = NgramTable(np.array([1, 2, 8, 1, 2, 7, 1, 2, 8, 1, 2, 7]), vocab_size=10, max_ngram=2)
    assert table.continuation([1, 2], 1) == [7]


def test_longest_known_context_wins_and_rare_contexts_are_dropped():
    # "5 1 2" -> 9 twice; "1 2" alone -> 3 three times; "6 1 2" -> 4 once (below min_count: "1 2" decides).
    corpus = [5, 1, 2, 9, 5, 1, 2, 9, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 6, 1, 2, 4]
    table = NgramTable(np.array(corpus), vocab_size=10, max_ngram=3, min_ngram=2, min_count=2)
    assert table.continuation([5, 1, 2], 1) == [9]
    assert table.continuation([6, 1, 2], 1) == [3]
    assert NgramTable(np.array(corpus), vocab_size=10, min_count=1).continuation([6, 1, 2], 1) == [4]


def test_continuation_stops_where_no_context_is_known():
    table = NgramTable(np.array([1, 2, 3, 4] * 3), vocab_size=10, max_ngram=2)
    assert table.continuation([1, 2], 10) == [3, 4, 1, 2, 3, 4, 1, 2, 3, 4]  # a cycle: every context known
    assert table.continuation([7, 8], 5) == []
    assert table.continuation([4], 5) == []  # shorter than the shortest context
    assert table.continuation([2, 3], 0) == []
    assert NgramTable(np.array([1]), vocab_size=10).continuation([1, 1], 3) == []  # a corpus with no n-grams


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(vocab_size=2**20, max_ngram=3), "overflows"),
        (dict(vocab_size=10, min_ngram=0), "min_ngram"),
        (dict(vocab_size=10, max_ngram=2, min_ngram=3), "min_ngram"),
        (dict(vocab_size=3), r"\[0, 3\)"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NgramTable(np.array([1, 2, 3]), **kwargs)


def test_draft_prefers_the_text_then_the_table_then_one_token_matches():
    table = NgramTable(np.array([4, 5, 60, 61, 4, 5, 60, 61, 8, 9, 70, 8, 9, 70]), vocab_size=100, max_ngram=2)
    # The text has "4 5" followed by 6: a two-token match in the text beats the corpus.
    assert NgramDraft([4, 5, 6, 4, 5], table=table).propose(2) == [6, 4]
    # No two-token match in the text, but the corpus knows "4 5" and "5 60" ("60 61" was seen once only).
    assert NgramDraft([1, 4, 5], table=table).propose(3) == [60, 61]
    # The corpus knows "8 9": it goes before the text's one-token match "9" -> 2.
    assert NgramDraft([9, 2, 3, 8, 9], table=table).propose(1) == [70]
    # Neither the text nor the corpus knows "1 9": the one-token match.
    assert NgramDraft([9, 2, 3, 1, 9], table=table).propose(2) == [2, 3]
    # Without one-token matches, the table still comes after the text's longer ones.
    assert NgramDraft([1, 4, 5], min_ngram=2, table=table).propose(3) == [60, 61]
    assert NgramDraft([9, 2, 3, 1, 9], min_ngram=2, table=table).propose(2) == []


VOCAB = 400  # of the shared prepared data (conftest.py)


@pytest.fixture
def data_dir(prepared: Path) -> Path:
    return prepared / "data"


def test_from_data_dir_reads_the_training_split(data_dir: Path):
    train = np.fromfile(bin_path(data_dir, "train"), dtype=np.uint16)
    table = NgramTable.from_data_dir(data_dir, max_tokens=5000)
    expected = NgramTable(train[:5000], vocab_size=VOCAB)
    assert table.vocab_size == VOCAB and table.next == expected.next and len(table.next[3]) > 100
    assert table.next != NgramTable(train[:2000], vocab_size=VOCAB).next


def test_from_data_dir_of_an_unprepared_directory(tmp_path: Path):
    with pytest.raises(DataError, match="gptlit prepare"):
        NgramTable.from_data_dir(tmp_path)


def test_from_model_is_the_table_of_the_models_greedy_continuations(data_dir: Path, monkeypatch):
    model = tiny_model(block_size=64, seed=0, vocab_size=VOCAB)
    # 10 stories: a batch of 8 and one of 2
    table = NgramTable.from_model(model, data_dir, stories=10, prompt_tokens=6, max_new_tokens=12, min_count=1)
    train = np.fromfile(bin_path(data_dir, "train"), dtype=np.uint16).astype(np.int64)
    openings = [train[start : start + 6].tolist() for start in np.load(offsets_path(data_dir, "train"))[:10]]
    tokens = [t for ids in openings for t in [*ids, *generate(model, ids, 12, temperature=0, draft_tokens=0)[0]]]
    assert table.next == NgramTable(np.array(tokens), VOCAB, min_count=1).next
    assert len(tokens) == 10 * 18 and len(table.next[3]) > 50

    # Decoding one of those openings again: the table guesses the continuation; same tokens, fewer passes.
    plain = generate(model, openings[3], 12, temperature=0)[0]
    counter = CountingForward(model, monkeypatch)
    assert generate(model, openings[3], 12, temperature=0, draft_table=table)[0] == plain
    # The prompt's pass gives the first token; two passes of 8 guesses (all right) and one token more give 11.
    assert counter.calls == 1 + 2 == 1 + expected_passes(openings[3], plain, 8, 64, table)
    assert expected_passes(openings[3], plain, 8, 64) > 2


def test_from_model_bad_arguments(data_dir: Path):
    model = tiny_model(block_size=64, seed=0, vocab_size=VOCAB)
    for bad in (dict(stories=0), dict(prompt_tokens=0), dict(batch_size=0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            NgramTable.from_model(model, data_dir, **bad)
    with pytest.raises(DataError, match="another tokenizer"):
        NgramTable.from_model(model, data_dir, tokenizer_sha256="0" * 64)


def test_from_model_openings_end_with_their_story_and_continuations_at_eos(data_dir: Path, monkeypatch):
    model = tiny_model(block_size=64, seed=0, vocab_size=VOCAB)
    train = np.fromfile(bin_path(data_dir, "train"), dtype=np.uint16).astype(np.int64)
    starts = np.load(offsets_path(data_dir, "train"))[:4].tolist()
    stories = [train[a:b].tolist() for a, b in itertools.pairwise(starts)]  # the first three
    long = max(len(story) for story in stories) + 5  # longer than any of the first three stories
    decoded: list[list[int]] = []
    eos = 7

    def recording(model, batch, options, eos_id):  # the decoding loop from_model runs
        assert eos_id == eos and options.temperature == 0
        decoded.extend(batch)
        yield dict.fromkeys(range(len(batch)), eos - 1)

    monkeypatch.setattr("gptlit.generation.draft.sample_stream", recording)
    NgramTable.from_model(model, data_dir, stories=3, prompt_tokens=long, eos_id=eos, batch_size=2)
    assert decoded == stories  # whole stories, none running into the next one
