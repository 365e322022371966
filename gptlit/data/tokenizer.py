"""Byte-level BPE tokenizer: training, saving, and the small wrapper the rest of gptlit uses."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from gptlit.checkpoint import read_checkpoint, tokenizer_json
from gptlit.errors import DataError, MissingFileError

# Fixed ids: the first three entries of every gptlit vocabulary.
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


class Tokenizer:
    """A byte-level BPE tokenizer with ``<pad>``, ``<bos>`` and ``<eos>`` at ids 0, 1 and 2.

    Any Unicode string survives ``decode(encode(s))``: the vocabulary holds all 256 bytes, and
    special-token strings inside ordinary text (a story that quotes ``"<eos>"``) are encoded as text,
    never as the special id.

    Args:
        hf_tokenizer: A ``tokenizers.Tokenizer`` built by :func:`train_tokenizer` (or loaded from its file).
    """

    def __init__(self, hf_tokenizer: HFTokenizer) -> None:
        for token, expected in zip(SPECIAL_TOKENS, (PAD_ID, BOS_ID, EOS_ID), strict=True):
            actual = hf_tokenizer.token_to_id(token)
            if actual != expected:
                raise DataError(
                    f"tokenizer has {token} at id {actual}, gptlit needs it at {expected}; "
                    "train a new tokenizer with gptlit.data.tokenizer.train_tokenizer"
                )
        # Not serialized by `tokenizers`, so set on every load.
        hf_tokenizer.encode_special_tokens = True
        self.hf = hf_tokenizer

    # Construction and serialization ------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"tokenizer file not found: {path}")
        try:
            hf_tokenizer = HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
            raise DataError(f"{path} is not a valid tokenizer.json ({err}); delete it to train a new one") from err
        return cls(hf_tokenizer)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> Tokenizer:
        """The tokenizer a gptlit checkpoint (``.ckpt``) carries, read weights-only."""
        return cls.from_str(tokenizer_json(read_checkpoint(path), path))

    @classmethod
    def from_str(cls, serialized: str) -> Tokenizer:
        return cls(HFTokenizer.from_str(serialized))

    def to_str(self) -> str:
        return self.hf.to_str()

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))

    @property
    def sha256(self) -> str:
        """A fingerprint of the vocabulary and merges, to tell whether token files match this tokenizer."""
        return hashlib.sha256(self.to_str().encode("utf-8")).hexdigest()

    # Properties ----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def pad_id(self) -> int:
        return PAD_ID

    # Encoding and decoding -----------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return [BOS_ID] * bos + ids + [EOS_ID] * eos

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads); ids only, no offsets."""
        encodings = self.hf.encode_batch_fast(list(texts), add_special_tokens=False)
        return [[BOS_ID] * bos + e.ids + [EOS_ID] * eos for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)


def check_same_tokenizer(recorded_sha256: str | None, tokenizer: Tokenizer | str, message: str) -> None:
    """Refuse token ids made by another tokenizer than ``tokenizer`` (a Tokenizer or its `Tokenizer.sha256`): they
    would name other tokens. ``recorded_sha256`` is the fingerprint recorded beside them; DataError(``message``)
    when the two differ."""
    sha256 = tokenizer if isinstance(tokenizer, str) else tokenizer.sha256
    if recorded_sha256 != sha256:
        raise DataError(message)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8000) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts``.

    Args:
        texts: The training texts (any iterable; consumed once).
        vocab_size: Target vocabulary size, special tokens and the 256 byte symbols included.
            A small corpus may yield fewer merges and so a smaller vocabulary.
    """
    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise DataError(f"vocab_size must be at least {minimum} (3 special tokens + 256 bytes), got {vocab_size}")
    hf = HFTokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(s)) == s exactly.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)
