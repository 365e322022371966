"""What training reads: windows of ``block_size + 1`` tokens of a token file, a shuffled order of them that resumes
exactly mid-epoch (a pure function of seed, epoch, position and rank), and the DataLoader that saves it."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, Dataset, Sampler


def window_starts(n_tokens: int, block_size: int, story_offsets: np.ndarray | None = None) -> np.ndarray:
    """Start of every window of ``block_size + 1`` tokens that fits in a split of ``n_tokens``.

    Window i starts at ``i * block_size``, so consecutive windows share one token (the last target of one is
    the first input of the next) and every token but the first is a target exactly once per epoch. With
    ``story_offsets``, windows start at story starts instead; they then overlap and run on into the next story.
    """
    if story_offsets is None:
        return np.arange((n_tokens - 1) // block_size, dtype=np.int64) * block_size
    return np.asarray(story_offsets[story_offsets + block_size + 1 <= n_tokens], dtype=np.int64)


def init_worker(worker_id: int, rank: int = 0) -> None:
    """A DataLoader worker's start: it ignores SIGTERM and SIGINT, and is seeded as Lightning would seed it.

    A job's end (SLURM, ``timeout``, ``docker stop``, ``kill -- -PGID``) and a Ctrl-C in a terminal signal every
    process of the job. A worker killed by them would end the main process in a traceback before it could
    stop at the end of its batch and save ``last.ckpt``; ignoring them leaves the stop to the main process,
    which shuts its workers down as it exits. (A worker outlives a dead main process by a few seconds at most:
    PyTorch's workers watch their parent.)
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Lightning adds this seeding (after seed_everything(workers=True)) only to a loader without a worker_init_fn.
    if os.environ.get("PL_SEED_WORKERS") == "1":
        pl_worker_init_function(worker_id, rank)


class TokenWindows(Dataset):
    """Item i is ``(x, y)``: int64 tensors of ``block_size`` tokens from the window at ``starts[i]``, y = x shifted.

    The file is memory-mapped afresh for each batch (``__getitems__``) and never kept: a memmap held for a
    whole run lets resident memory grow towards the file size, and nothing is open when workers fork.
    """

    def __init__(self, path: str | Path, dtype: np.dtype, starts: np.ndarray, block_size: int) -> None:
        self.path, self.dtype, self.starts, self.block_size = str(path), np.dtype(dtype), starts, block_size

    def __len__(self) -> int:
        return len(self.starts)

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        rows = np.stack([tokens[s : s + self.block_size + 1] for s in self.starts[indices]])  # (B, T + 1)
        del tokens
        rows = torch.from_numpy(rows.astype(np.int64))
        return [(row[:-1], row[1:]) for row in rows]  # default_collate stacks them into (B, T) and (B, T)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([index])[0]


class WindowSampler(Sampler[int]):
    """This rank's share of a seeded permutation of windows, from position ``start`` on.

    The order is a pure function of ``(seed, epoch, rank, world_size)``: the permutation of all windows is drawn
    from ``default_rng([seed, epoch])``, its tail cut so every rank gets the same count, and rank r takes every
    ``world_size``-th element from r on, so ranks never share a window.
    """

    def __init__(self, num_windows: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_windows, self.seed, self.rank, self.world_size = num_windows, seed, rank, world_size
        self.epoch = 0
        self.start = 0  # samples of this epoch already handed out (set when resuming)

    def __len__(self) -> int:
        return self.num_windows // self.world_size

    def order(self, epoch: int) -> np.ndarray:
        permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        return permutation[self.rank : len(self) * self.world_size : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch)[self.start :].tolist())


class ResumableDataLoader(DataLoader):
    """A training DataLoader that knows its epoch and how many batches it has handed out in it.

    Lightning saves ``state_dict()`` of the train DataLoader itself into checkpoints and calls
    ``load_state_dict()`` before it creates the resumed iterator, so a resumed run continues with exactly the
    batches an uninterrupted run would have seen. The first ``iter()`` after construction or
    ``load_state_dict()`` continues where that state left off (a state saved after an epoch's last batch goes
    on with the next epoch); any later ``iter()`` starts an epoch afresh: the one ``current_epoch()`` names,
    or, without it, the next one.

    Args:
        dataset: The windows to batch.
        sampler: Picks the order of the windows; the loader sets its epoch and start.
        current_epoch: The trainer's epoch, when there is a trainer. Lightning may call ``iter()`` twice at
            the start of an epoch (``reload_dataloaders_every_n_epochs``), so counting calls is not enough.
        **kwargs: Passed on to :class:`torch.utils.data.DataLoader` (``batch_size``, ``num_workers``, ...).
    """

    def __init__(
        self, dataset: Dataset, sampler: WindowSampler, current_epoch: Callable[[], int] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(dataset, sampler=sampler, drop_last=True, **kwargs)
        self._current_epoch = current_epoch
        self.epoch = current_epoch() if current_epoch is not None else 0
        self.batches = 0  # batches handed out in this epoch
        self._continue = True  # the next iter() continues (epoch, batches) instead of starting an epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.epoch, self.batches = int(state_dict["epoch"]), int(state_dict["batches"])
        self._continue = True

    def __iter__(self) -> Iterator[Any]:
        if not self._continue:
            self.epoch = self._current_epoch() if self._current_epoch is not None else self.epoch + 1
            self.batches = 0
        elif self.batches >= len(self):
            self.epoch, self.batches = self.epoch + 1, 0
        self._continue = False
        self.sampler.epoch, self.sampler.start = self.epoch, self.batches * self.batch_size
        return self._count(super().__iter__())

    def _count(self, batches: Iterator[Any]) -> Iterator[Any]:
        # Counted in the main process as each batch is handed over (worker prefetch does not count), and
        # before the yield: once the caller holds batch k, state_dict() says k.
        for batch in batches:
            self.batches += 1
            yield batch
