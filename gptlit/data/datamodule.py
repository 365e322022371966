"""TextDataModule: prepared token files served as shuffled, resumable windows of ``block_size + 1`` tokens.

Preparation (corpus -> tokenizer and token files) lives in :mod:`gptlit.data.prepare`, reading sources in
:mod:`gptlit.data.sources`; the window dataset, the sampler and the resumable DataLoader in :mod:`gptlit.data.loading`;
this file holds the DataModule that ties them to Lightning.
"""

from __future__ import annotations

import zlib
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from gptlit.data.loading import ResumableDataLoader, TokenWindows, WindowSampler, init_worker, window_starts
from gptlit.data.options import DataOptions
from gptlit.data.prepare import prepare_dataset
from gptlit.data.store import META_FILE, TOKENIZER_FILE, check_bin, offsets_path, read_meta, redo_hint, token_dtype
from gptlit.data.tokenizer import Tokenizer, check_same_tokenizer
from gptlit.errors import DataError

__all__ = [
    "DataError",
    "DataOptions",
    "ResumableDataLoader",
    "TextDataModule",
    "TinyStoriesDataModule",
    "TokenWindows",
    "WindowSampler",
    "token_dtype",
]

# The check on setup reads at most this many pieces of each split: all of a small file, spaced ones of a big one.
ID_CHECK_CHUNKS = 64
# The pieces' size in a directory prepared before meta.json held checksums, in tokens.
ID_CHECK_TOKENS = 1 << 14


def check_ids(
    path: Path, dtype: np.dtype, vocab_size: int, data_dir: str | Path, checksums: list[int] | None, chunk_bytes: int
) -> None:
    """Check a sample of ``path``'s pieces of ``chunk_bytes`` (all of them, for a small file): raise DataError if
    one holds an id not below ``vocab_size``, or, given ``checksums`` (meta.json's, one CRC-32 a piece), if a
    piece's CRC-32 differs from its own (ids overwritten with others, even valid ones).
    """
    data = np.memmap(path, dtype=np.uint8, mode="r")
    n_chunks = -(-len(data) // chunk_bytes)
    if checksums is not None and len(checksums) != n_chunks:
        raise DataError(
            f"{path} has {n_chunks} pieces, {META_FILE} has checksums of {len(checksums)}; {redo_hint(data_dir)}"
        )
    picks = np.unique(np.linspace(0, n_chunks - 1, min(n_chunks, ID_CHECK_CHUNKS), dtype=np.int64))
    for i in picks.tolist():
        piece = data[i * chunk_bytes : (i + 1) * chunk_bytes]
        top = int(piece.view(dtype).max())
        if top >= vocab_size:  # the more telling of the two, where both fail
            raise DataError(
                f"{path} holds token id {top}, not below the vocabulary size {vocab_size}; {redo_hint(data_dir)}"
            )
        if checksums is not None and zlib.crc32(piece) != checksums[i]:
            raise DataError(
                f"{path} has changed since it was prepared (bytes {i * chunk_bytes}-{i * chunk_bytes + len(piece)} "
                f"differ from the checksum in {META_FILE}); re-prepare it: {redo_hint(data_dir)}"
            )


class TextDataModule(L.LightningDataModule):
    """A corpus of texts (TinyStories by default) as windows of tokens for next-token prediction.

    ``prepare_data`` turns the source into ``data_dir`` (tokenizer.json, train.bin, val.bin, meta.json) once;
    later runs with the same settings find it up to date. Batches are ``(x, y)``, int64 ``(batch_size,
    block_size)`` each, with y = x shifted by one token; the training order is resumable mid-epoch.

    Args:
        source: A Hugging Face Hub dataset id, or local data: a ``.txt`` in the official TinyStories layout
            (stories separated by a line ``<|endoftext|>``), ``.jsonl``/``.json`` or ``.parquet`` records,
            a directory of such files (one laid out as a hub repository keeps its splits and configurations),
            or a glob.
        data_dir: Where the tokenizer and token files are written and read.
        vocab_size: Tokenizer size to train, and the vocabulary size the model is built with. None: take it
            from the existing tokenizer (``tokenizer_path``, else ``data_dir/tokenizer.json``).
        tokenizer_path: Use this tokenizer.json instead of training one.
        tokenizer_train_stories: Train the tokenizer on the first this many training stories (None: all).
        val_fraction: Share of the training split's stories held out for validation (at least one) when no
            validation split is read; which stories is fixed by ``seed``.
        block_size: Tokens per training example (the model's context length).
        batch_size: Examples per batch, per device.
        num_workers: DataLoader worker processes (0: load in the main process).
        seed: Seeds the held-out split and the per-epoch shuffling of training windows.
        align_to_stories: Start training windows at story starts instead of every ``block_size`` tokens.
        config_name: The configuration of a hub data set (or of a local repository whose README.md
            declares ``configs:``), e.g. ``sample-10BT`` of ``HuggingFaceFW/fineweb-edu``; null: its default.
        text_field: The field of each ``.json``/``.jsonl``/``.parquet`` record (hub column) holding the text.
        train_split: The source's split to train on (local files have the one split ``train``).
        val_split: The source's split to validate on; null: hold ``val_fraction`` of the training split out,
            as is done for a local source that has no ``validation`` split.
    """

    def __init__(
        self,
        source: str = "roneneldan/TinyStories",
        data_dir: str = "data/tinystories",
        vocab_size: int | None = 8000,
        tokenizer_path: str | None = None,
        tokenizer_train_stories: int | None = 100_000,
        val_fraction: float = 0.01,
        block_size: int = 256,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 1337,
        align_to_stories: bool = False,
        config_name: str | None = None,
        text_field: str = "text",
        train_split: str = "train",
        val_split: str | None = "validation",
    ) -> None:
        super().__init__()
        # Only the first process of the whole job prepares data_dir, then all ranks read it: on a cluster data_dir
        # lies on a file system every node sees, and two nodes preparing it at once would race for its files.
        self.prepare_data_per_node = False
        self.options = DataOptions(
            source=source,
            config_name=config_name,
            text_field=text_field,
            train_split=train_split,
            val_split=val_split,
            val_fraction=val_fraction,
            seed=seed,
            vocab_size=vocab_size,
            tokenizer_path=tokenizer_path,
            tokenizer_train_stories=tokenizer_train_stories,
        )
        for name, value in (("block_size", block_size), ("batch_size", batch_size)):
            if value < 1:
                raise DataError(f"{name} must be a positive integer, got {value}")
        self.data_dir, self.seed = data_dir, seed
        self.block_size, self.batch_size, self.num_workers = block_size, batch_size, num_workers
        self.align_to_stories = align_to_stories
        self._tokenizer: Tokenizer | None = None
        self._meta: dict[str, Any] | None = None
        self._datasets: dict[str, TokenWindows] = {}
        self._train_loader: ResumableDataLoader | None = None
        self._pending_loader_state: dict[str, int] | None = None

    # What other parts of gptlit read -------------------------------------------------------------

    @property
    def tokenizer_file(self) -> Path:
        path = self.options.tokenizer_path
        return Path(path) if path else Path(self.data_dir) / TOKENIZER_FILE

    @property
    def vocab_size(self) -> int:
        """The vocabulary size to build the model with: the configured one (the tokenizer may have fewer)."""
        if self.options.vocab_size is not None:
            return self.options.vocab_size
        if not self.tokenizer_file.is_file():
            raise DataError(
                f"vocab_size is None, so it comes from {self.tokenizer_file}, which does not exist: "
                "set --data.vocab_size or --data.tokenizer_path"
            )
        return self.tokenizer.vocab_size

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_file(self.tokenizer_file)
        return self._tokenizer

    @property
    def meta(self) -> dict[str, Any]:
        if self._meta is None:
            self._meta = read_meta(self.data_dir)
        return self._meta

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes of the validation stories (stripped, separators excluded) per validation token (every
        token in val.bin, ``<bos>``/``<eos>`` included), so that bits per byte = loss / ln 2 / bytes_per_token
        when the loss is averaged over all target tokens, specials included."""
        val = self.meta["splits"]["val"]
        return val["text_bytes"] / val["tokens"]

    # Lightning hooks -----------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Write ``data_dir`` from ``source`` unless it is up to date; also works without a Trainer."""
        prepare_dataset(self.options, self.data_dir)
        self._tokenizer = self._meta = None  # re-read what was just written

    def setup(self, stage: str | None = None) -> None:
        """Check the prepared files and build the window datasets (``fit``: train and val; others: val)."""
        meta = self._meta = read_meta(self.data_dir)
        check_same_tokenizer(
            meta["settings"].get("tokenizer_sha256"),
            self.tokenizer,
            f"{self.tokenizer_file} is not the tokenizer {self.data_dir} was prepared with; {redo_hint(self.data_dir)}",
        )
        if meta["vocab_size"] > self.vocab_size:
            raise DataError(
                f"{self.tokenizer_file} has {meta['vocab_size']} tokens, more than vocab_size={self.vocab_size}"
            )
        splits = ["train", "val"] if stage in (None, "fit") else ["val"]
        for split in splits:
            self._datasets[split] = self._windows(split, meta)
        if len(self._datasets["val"]) == 0:
            raise DataError(
                f"{Path(self.data_dir) / 'val.bin'} has {meta['splits']['val']['tokens']} tokens, fewer than "
                f"block_size + 1 = {self.block_size + 1}: lower --data.block_size or raise --data.val_fraction"
            )
        if "train" in self._datasets and len(self._datasets["train"]) // self._world()[1] < self.batch_size:
            raise DataError(
                f"{Path(self.data_dir) / 'train.bin'} has too few windows of {self.block_size + 1} tokens for one "
                f"batch of {self.batch_size} per device: lower --data.batch_size or --data.block_size"
            )

    def _windows(self, split: str, meta: dict[str, Any]) -> TokenWindows:
        path, dtype, n_tokens = check_bin(self.data_dir, meta, split)
        # Directories prepared before meta.json held checksums are checked for ids only.
        chunk_bytes = meta.get("crc32_chunk_bytes", ID_CHECK_TOKENS * dtype.itemsize)
        check_ids(path, dtype, meta["vocab_size"], self.data_dir, meta["splits"][split].get("crc32"), chunk_bytes)
        story_offsets = None
        if split == "train" and self.align_to_stories:
            story_offsets = np.load(offsets_path(self.data_dir, split))
        starts = window_starts(n_tokens, self.block_size, story_offsets)
        if split == "val":
            # Every rank gets the same number of windows (the tail is dropped), in order.
            rank, world_size = self._world()
            starts = starts[rank : len(starts) // world_size * world_size : world_size]
        return TokenWindows(path, dtype, starts, self.block_size)

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader_kwargs(self) -> dict[str, Any]:
        on_cuda = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "pin_memory": on_cuda,
            "persistent_workers": self.num_workers > 0,
            "worker_init_fn": partial(init_worker, rank=self._world()[0]) if self.num_workers > 0 else None,
        }

    def train_dataloader(self) -> ResumableDataLoader:
        if "train" not in self._datasets:
            self.setup("fit")
        rank, world_size = self._world()
        dataset = self._datasets["train"]
        sampler = WindowSampler(len(dataset), self.seed, rank, world_size)
        trainer = self.trainer
        current_epoch = (lambda: trainer.current_epoch) if trainer is not None else None
        loader = ResumableDataLoader(dataset, sampler, current_epoch, **self._loader_kwargs())
        if self._pending_loader_state is not None:
            loader.load_state_dict(self._pending_loader_state)
            self._pending_loader_state = None
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> DataLoader:
        if "val" not in self._datasets:
            self.setup("validate")
        return DataLoader(self._datasets["val"], shuffle=False, **self._loader_kwargs())

    def test_dataloader(self) -> DataLoader:
        """The validation split: gptlit prepares no separate test split."""
        return self.val_dataloader()

    # The training loader's position also travels in the DataModule's own checkpoint entry, restored before
    # any dataloader exists. Lightning restores the loader itself too, but skips that when the train loader
    # was built early, e.g. by reading trainer.estimated_stepping_batches in configure_optimizers.

    def state_dict(self) -> dict[str, Any]:
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_loader_state = state_dict.get("train_loader")


TinyStoriesDataModule = TextDataModule  # its earlier name, for code written against gptlit 0.2.0
