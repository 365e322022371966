"""The token store: the files of a prepared data directory, how they are named, typed, described and checked.

A prepared data directory holds

    tokenizer.json                      the byte-level BPE tokenizer (absent when ``tokenizer_path`` names one)
    train.bin, val.bin                  every story as ``<bos> story <eos>``, concatenated: a raw array of
                                        uint16 ids (uint32 above 65,535), readable with ``np.memmap``
    train_offsets.npy, val_offsets.npy  int64 start of each story in its ``.bin``
    meta.json                           written last: describes the files above and the settings behind them,
                                        with a CRC-32 of every ``CHECKSUM_CHUNK_BYTES`` of each ``.bin``

`gptlit.data.prepare` writes it; `gptlit.data.datamodule` and `gptlit.generation.draft` read it, through the
functions here.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from gptlit.data.tokenizer import check_same_tokenizer
from gptlit.errors import DataError

FORMAT_VERSION = 1
SPLITS = ("train", "val")
META_FILE, TOKENIZER_FILE = "meta.json", "tokenizer.json"
# A .bin's checksums in meta.json (``splits.<split>.crc32``) cover pieces of this many bytes (the last one shorter):
# some 16,000 numbers per GB of tokens, of which a check reads only the pieces it samples.
CHECKSUM_CHUNK_BYTES = 1 << 16


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest dtype that holds every id below ``vocab_size``: uint16 up to 65,535 tokens, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65_535 else np.dtype(np.uint32)


def bin_path(data_dir: str | Path, split: str) -> Path:
    return Path(data_dir) / f"{split}.bin"


def offsets_path(data_dir: str | Path, split: str) -> Path:
    return Path(data_dir) / f"{split}_offsets.npy"


def redo_hint(data_dir: str | Path) -> str:
    return f"delete {data_dir} and run `python -m gptlit prepare`"


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    """``meta.json`` of a prepared directory; DataError if it is missing, unreadable or of another format."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise DataError(f"{path} not found: run `python -m gptlit prepare` (or fit, which prepares first)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is unreadable ({err}); {redo_hint(data_dir)}") from err
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise DataError(
            f"{path} has format version {version}, this gptlit reads version {FORMAT_VERSION}; {redo_hint(data_dir)}"
        )
    return meta


def check_bin(data_dir: str | Path, meta: dict[str, Any], split: str) -> tuple[Path, np.dtype, int]:
    """Check that ``{split}.bin`` is complete according to ``meta``; returns its path, dtype and token count."""
    path, dtype = bin_path(data_dir, split), np.dtype(meta["dtype"])
    if not path.is_file():
        raise DataError(f"{path} not found; {redo_hint(data_dir)}")
    size, expected = path.stat().st_size, meta["splits"][split]["tokens"]
    if size % dtype.itemsize:
        raise DataError(f"{path} is truncated ({size} bytes, not a whole number of {dtype}); {redo_hint(data_dir)}")
    if size // dtype.itemsize != expected:
        raise DataError(
            f"{path} holds {size // dtype.itemsize} tokens, {META_FILE} says {expected}; {redo_hint(data_dir)}"
        )
    return path, dtype, expected


class ChunkChecksums:
    """The CRC-32 of each ``chunk_bytes`` piece of a byte stream that arrives in parts of any size.

    Args:
        chunk_bytes: The size of the pieces; the last one holds what is left.
    """

    def __init__(self, chunk_bytes: int = CHECKSUM_CHUNK_BYTES) -> None:
        self.chunk_bytes, self.sums = chunk_bytes, []
        self.crc = self.filled = 0  # of the piece being filled

    def update(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            take = min(len(view), self.chunk_bytes - self.filled)
            self.crc, self.filled, view = zlib.crc32(view[:take], self.crc), self.filled + take, view[take:]
            if self.filled == self.chunk_bytes:
                self.sums.append(self.crc)
                self.crc = self.filled = 0

    def finish(self) -> list[int]:
        """The checksums of all pieces, the last partial one included."""
        return [*self.sums, self.crc] if self.filled else list(self.sums)


def check_files(data_dir: str | Path, meta: dict[str, Any]) -> None:
    """Check that every file ``meta`` describes is present and complete (cheap: sizes and headers only)."""
    for split in SPLITS:
        check_bin(data_dir, meta, split)
        path = offsets_path(data_dir, split)
        try:
            n_offsets = np.load(path, mmap_mode="r").shape[0]
        except (OSError, ValueError) as err:
            raise DataError(f"{path} is missing or unreadable ({err}); {redo_hint(data_dir)}") from err
        if n_offsets != meta["splits"][split]["stories"]:
            expected = meta["splits"][split]["stories"]
            raise DataError(f"{path} lists {n_offsets} stories, {META_FILE} says {expected}; {redo_hint(data_dir)}")


def training_tokens(data_dir: str | Path, tokenizer_sha256: str | None = None) -> tuple[np.ndarray, int]:
    """The tokens of a prepared directory's ``train.bin`` (memory-mapped) and its vocabulary size.

    With ``tokenizer_sha256`` (`Tokenizer.sha256` of a model's tokenizer), a directory tokenized by another
    tokenizer is refused: its ids would name other tokens.
    """
    meta = read_meta(data_dir)
    if tokenizer_sha256 is not None:
        check_same_tokenizer(
            meta["settings"].get("tokenizer_sha256"),
            tokenizer_sha256,
            f"{data_dir} was tokenized by another tokenizer than the model's: pass the data directory the "
            "model was trained on",
        )
    path, dtype, count = check_bin(data_dir, meta, "train")
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,)), meta["vocab_size"]
