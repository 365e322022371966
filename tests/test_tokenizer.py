"""The byte-level BPE tokenizer: lossless round trips, fixed special ids, serialization, HF loading."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never the network

import pytest
from helpers import MODEL, make_dm
from hypothesis import given, settings
from hypothesis import strategies as st

from gptlit.data.store import training_tokens
from gptlit.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, train_tokenizer
from gptlit.errors import DataError
from gptlit.model.config import GPTConfig
from gptlit.training.module import GPTLitModule

CORPUS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside.",
    "Tom and his dog went to the park. They saw a big red ball and played all day.",
    "The sun was shining and the birds were singing. Lily was very happy.",
    'One day, a small cat found a shiny key under a tree. "What is this?" she asked.',
    "Ben wanted to help his mom bake a cake, so he got the eggs and the flour.",
]
ORDINARY = [
    "Once upon a time, Lily found a ball.",
    "  Two spaces, a tab\tand a newline\nthen more.",
    "Numbers 12345 and punctuation!?;: (brackets) [too] {also}",
    "Unicode: café, naïve, 日本語, 🙂, Ελληνικά",
    "",
]
HARD = [
    "",
    " ",
    "🙂👍🏽👨‍👩‍👧",  # emoji, a skin-tone modifier, a ZWJ sequence
    "e\u0301 a\u0308 n\u0303\u0323",  # combining marks
    "日本語の文章と中文句子",
    "مرحبا بالعالم שלום",  # right to left
    "\u202eevil\u202c \u200b\ufeff",  # bidi override, zero-width space, BOM
    "\x00\x01\t\r\n\x7f",
    "<eos>",
    "<bos>",
    "<pad>",
    "a story that quotes <eos> and <bos> and <pad> mid-sentence<eos>",
    "<<eos>> </eos> <EOS>",
    "\U0010ffff\U0001f600",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(CORPUS * 20, vocab_size=320)


@settings(max_examples=150, deadline=None)
@given(text=st.text())
def test_round_trip_random_unicode(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


@pytest.mark.parametrize("text", HARD)
def test_round_trip_hard_cases(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    # Special-token strings in a text are text: they never become the special ids.
    assert not {PAD_ID, BOS_ID, EOS_ID} & set(ids)


def test_special_ids_are_fixed(tokenizer):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    for token, i in (("<pad>", 0), ("<bos>", 1), ("<eos>", 2)):
        assert tokenizer.hf.token_to_id(token) == i
    assert tokenizer.decode([BOS_ID, EOS_ID, PAD_ID]) == ""
    assert tokenizer.decode([EOS_ID], skip_special_tokens=False) == "<eos>"


def test_training_learns_merges(tokenizer):
    assert 259 < tokenizer.vocab_size <= 320
    text = "Once upon a time, there was a little girl"
    assert len(tokenizer.encode(text)) < 0.75 * len(text.encode("utf-8"))


def test_encode_with_bos_and_eos_wraps(tokenizer):
    text = "Lily saw a cat."
    ids = tokenizer.encode(text)
    assert tokenizer.encode(text, bos=True) == [BOS_ID, *ids]
    assert tokenizer.encode(text, eos=True) == [*ids, EOS_ID]
    wrapped = tokenizer.encode(text, bos=True, eos=True)
    assert wrapped == [BOS_ID, *ids, EOS_ID]
    assert tokenizer.decode(wrapped) == text
    assert tokenizer.encode("", bos=True, eos=True) == [BOS_ID, EOS_ID]


def test_encode_batch_equals_per_text_encode(tokenizer):
    texts = ORDINARY + HARD
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]
    assert tokenizer.encode_batch(texts, bos=True, eos=True) == [tokenizer.encode(t, bos=True, eos=True) for t in texts]


def test_serialization_round_trips(tokenizer, tmp_path):
    texts = ORDINARY + HARD
    expected = [tokenizer.encode(t) for t in texts]

    from_str = Tokenizer.from_str(tokenizer.to_str())
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    from_file = Tokenizer.from_file(path)

    for loaded in (from_str, from_file):
        assert [loaded.encode(t) for t in texts] == expected
        assert loaded.sha256 == tokenizer.sha256
        assert loaded.vocab_size == tokenizer.vocab_size
        # encode_special_tokens is not serialized: a loaded tokenizer must still treat "<eos>" as text.
        assert EOS_ID not in loaded.encode("<eos>")
    # The fingerprint tells tokenizers apart.
    other = train_tokenizer(CORPUS[:2] * 20, vocab_size=320)
    assert other.sha256 != tokenizer.sha256


def test_transformers_loads_the_same_tokenizer(tokenizer, tmp_path):
    from transformers import PreTrainedTokenizerFast

    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in ORDINARY + HARD[:8]:  # no special-token strings inside the text
        ids = tokenizer.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == tokenizer.decode(ids) == text
    assert hf.convert_tokens_to_ids(["<pad>", "<bos>", "<eos>"]) == [PAD_ID, BOS_ID, EOS_ID]


def test_minimum_vocab_still_round_trips():
    small = train_tokenizer(CORPUS, vocab_size=259)  # specials and bytes, no merges
    assert small.vocab_size == 259
    text = "Lily 🙂 日本"
    assert len(small.encode(text)) == len(text.encode("utf-8"))
    assert small.decode(small.encode(text)) == text


def test_vocab_size_below_minimum_raises():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CORPUS, vocab_size=258)


def test_from_file_missing_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        Tokenizer.from_file(tmp_path / "missing.json")


@pytest.mark.parametrize("content", ["not json at all", "{}", '{"model": {"type": "BPE"}}'])
def test_from_file_garbage_raises_value_error(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="tokenizer"):
        Tokenizer.from_file(path)


def test_from_file_without_gptlit_special_ids_raises(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<bos>", "<pad>"])
    hf.train_from_iterator(CORPUS, trainer=trainer)
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    with pytest.raises(ValueError, match="<pad> at id 2"):
        Tokenizer.from_file(path)


def test_token_ids_of_another_tokenizer_are_refused_alike_everywhere(prepared: Path, tmp_path: Path) -> None:
    """A prepared directory (read by the data module, or for its training tokens) and a resumed checkpoint: each
    checks its tokenizer against the one it meets with the same check, a DataError."""
    data = tmp_path / "data"
    shutil.copytree(prepared / "data", data)
    mine = Tokenizer.from_file(data / "tokenizer.json")
    other = train_tokenizer(CORPUS, vocab_size=300)
    meta = json.loads((data / "meta.json").read_text())
    meta["settings"]["tokenizer_sha256"] = other.sha256  # as if prepared with the other tokenizer
    (data / "meta.json").write_text(json.dumps(meta))
    module = GPTLitModule(config=GPTConfig(**MODEL, vocab_size=mine.vocab_size))
    module.tokenizer = mine  # from the data module
    checkpoint = {"gptlit": {"format": 2, "config": module.config.to_dict(), "tokenizer": other.to_str()}}
    refusals = {
        "is not the tokenizer": lambda: make_dm(data, prepared / "stories.txt").setup("fit"),
        "was tokenized by another tokenizer": lambda: training_tokens(data, mine.sha256),
        "was trained with another tokenizer": lambda: module.on_load_checkpoint(checkpoint),
    }
    for message, refuse in refusals.items():
        with pytest.raises(DataError, match=message):
            refuse()
    training_tokens(data, other.sha256)  # the tokenizer the directory records: its tokens are read
