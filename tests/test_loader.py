"""Tests for loading (gptlit.data.datamodule): windows, the sampler, the resumable loader, resume under Lightning."""

import signal
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from conftest import make_stories
from helpers import make_dm, write_stories
from lightning.pytorch.callbacks import ModelCheckpoint

from gptlit.data.datamodule import ResumableDataLoader, TokenWindows, WindowSampler
from gptlit.data.tokenizer import BOS_ID

# Windows, sampler and resumable loader ---------------------------------------------------------------


@pytest.fixture
def counting_bin(tmp_path: Path) -> Path:
    """A token file whose id at position i is i, so every window names its own start."""
    path = tmp_path / "tokens.bin"
    np.arange(16 * 64 + 1, dtype=np.uint16).tofile(path)  # exactly 64 windows of block 16
    return path


def make_loader(path: Path, rank: int = 0, world_size: int = 1, batch_size: int = 8) -> ResumableDataLoader:
    windows = TokenWindows(path, np.uint16, np.arange(64) * 16, block_size=16)
    return ResumableDataLoader(
        windows, WindowSampler(64, seed=7, rank=rank, world_size=world_size), batch_size=batch_size
    )


def starts_of(batches: list) -> list[int]:
    return [int(s) for x, _ in batches for s in x[:, 0]]


def test_windows_are_shifted_by_one(counting_bin: Path) -> None:
    x, y = next(iter(make_loader(counting_bin)))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x, x[:, :1] + torch.arange(16))  # block_size consecutive tokens
    assert torch.equal(y, x + 1)


def test_an_epoch_visits_every_window_once_in_a_new_order_each_epoch(counting_bin: Path) -> None:
    loader = make_loader(counting_bin)
    epoch0, epoch1 = starts_of(list(loader)), starts_of(list(loader))
    assert sorted(epoch0) == sorted(epoch1) == list(range(0, 64 * 16, 16))
    assert epoch0 != epoch1 and loader.epoch == 1


def test_ranks_share_the_epoch_without_overlap(counting_bin: Path) -> None:
    rank0, rank1 = (starts_of(list(make_loader(counting_bin, r, 2, batch_size=4))) for r in (0, 1))
    assert len(rank0) == len(rank1) == 32
    assert sorted(rank0 + rank1) == list(range(0, 64 * 16, 16))
    # An odd count: the tail is dropped so both ranks still get as many windows.
    assert [len(WindowSampler(63, 7, r, 2)) for r in (0, 1)] == [31, 31]
    assert set(WindowSampler(63, 7, 0, 2)).isdisjoint(WindowSampler(63, 7, 1, 2))


@pytest.mark.parametrize("k", [3, 8, 11])  # mid-epoch, end of the first epoch (8 batches), into the second
def test_loader_state_resumes_exactly(counting_bin: Path, k: int) -> None:
    uninterrupted = make_loader(counting_bin)
    expected = starts_of(list(uninterrupted) + list(uninterrupted))  # two epochs of 8 batches of 8 windows
    first = make_loader(counting_bin)
    iterator, seen = iter(first), []
    for _ in range(k):
        try:
            seen.append(next(iterator))
        except StopIteration:  # the epoch is over: the next iter() starts the next one
            iterator = iter(first)
            seen.append(next(iterator))
    resumed = make_loader(counting_bin)
    resumed.load_state_dict(first.state_dict())
    # One iter() finishes the epoch in progress; a state saved after an epoch's last batch goes on with the next.
    end_of_epoch = (k // 8 + 1) * 8
    assert starts_of(seen + list(resumed)) == expected[: end_of_epoch * 8]


def test_datamodule_shards_train_and_val_by_rank(prepared: Path) -> None:
    seen: dict[str, list[set]] = {"train": [], "val": []}
    for rank in (0, 1):
        dm = make_dm(prepared / "data", prepared / "stories.txt")
        device = SimpleNamespace(root_device=torch.device("cpu"))
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, current_epoch=0, strategy=device)
        for split, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader())):
            rows = torch.cat([x for x, _ in loader]).tolist()  # (windows of this rank, T)
            seen[split].append({tuple(row) for row in rows})
            assert len(seen[split][-1]) == len(rows)
    for split, (rank0, rank1) in seen.items():
        assert len(rank0) == len(rank1) > 0 and rank0.isdisjoint(rank1), split


def test_aligned_windows_start_at_stories(prepared: Path) -> None:
    dm = make_dm(prepared / "data", prepared / "stories.txt", align_to_stories=True)
    for x, _ in dm.train_dataloader():
        assert (x[:, 0] == BOS_ID).all()
    offsets = np.load(prepared / "data" / "train_offsets.npy")
    assert len(dm.train_dataloader().dataset) == np.count_nonzero(
        offsets + 33 <= len(np.fromfile(prepared / "data" / "train.bin", np.uint16))
    )


def test_val_loader_is_in_order_and_bytes_per_token(prepared: Path) -> None:
    dm = make_dm(prepared / "data", prepared / "stories.txt")
    tokens = np.fromfile(prepared / "data" / "val.bin", dtype=np.uint16)
    x = torch.cat([x for x, _ in dm.val_dataloader()])
    assert torch.equal(x.flatten(), torch.from_numpy(tokens[: x.numel()].astype(np.int64)))
    val = dm.meta["splits"]["val"]
    assert dm.bytes_per_token == val["text_bytes"] / len(tokens) > 1


def test_loader_workers_leave_stop_signals_to_the_main_process(prepared: Path, tmp_path: Path) -> None:
    """SIGTERM and Ctrl-C reach every process of a job: workers ignore them, the main process stops the run."""
    dm = make_dm(prepared / "data", prepared / "stories.txt", num_workers=1)
    dm.setup("fit")
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        try:
            loader.worker_init_fn(0)  # what each worker runs first
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        finally:
            for number, handler in saved.items():
                signal.signal(number, handler)


# Lightning: a run resumed from a mid-epoch checkpoint sees the batches of an uninterrupted run ------


class Recorder(L.LightningModule):
    def __init__(self, read_estimated_steps: bool = False) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.read_estimated_steps = read_estimated_steps
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append(batch[0].clone())
        return self.layer(batch[0][:, :1].float()).mean()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.read_estimated_steps:  # known to make Lightning skip restoring the loader's own state
            assert self.trainer.estimated_stepping_batches > 0
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(root: Path, max_steps: int, run: str, **kwargs: object) -> tuple[list[torch.Tensor], int]:
    """Train ``Recorder`` for ``max_steps``, checkpointing every step into ``root/run``.

    Returns the batches it trained on and the batches per epoch.
    """
    ckpt_path = kwargs.pop("ckpt_path", None)
    num_workers = int(kwargs.pop("num_workers", 0))
    reload = int(kwargs.pop("reload_dataloaders_every_n_epochs", 0))
    dm = make_dm(root / "data", root / "stories.txt", batch_size=16, num_workers=num_workers)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=100,  # not -1, so that estimated_stepping_batches builds the train loader early
        max_steps=max_steps,
        logger=False,
        callbacks=[ModelCheckpoint(root / run, filename="{step}", every_n_train_steps=1, save_top_k=-1)],
        use_distributed_sampler=False,
        reload_dataloaders_every_n_epochs=reload,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    model = Recorder(**kwargs)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen, trainer.num_training_batches


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[torch.Tensor], int]:
    """80 stories (block 32, batch 16: a few batches an epoch) and the batches of 8 uninterrupted steps."""
    root = tmp_path_factory.mktemp("small")
    write_stories(root / "stories.txt", make_stories(80), "txt")
    full, epoch_length = fit(root, max_steps=8, run="full")
    assert 2 <= epoch_length <= 6  # the 8 steps cross an epoch boundary
    return root, full, epoch_length


def assert_same_batches(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want, strict=True), start=1):
        assert torch.equal(a, b), f"batch {step} differs"


# Each resumed run writes its checkpoints elsewhere, which Lightning's own ModelCheckpoint warns about.
@pytest.mark.filterwarnings("ignore:The dirpath has changed")
@pytest.mark.parametrize(
    ("stop", "read_estimated_steps"), [(3, False), ("end_of_epoch", False), (3, True), ("second_epoch", True)]
)
def test_lightning_resume_sees_the_uninterrupted_batches(
    small_run: tuple[Path, list[torch.Tensor], int], stop: int | str, read_estimated_steps: bool
) -> None:
    root, full, epoch_length = small_run
    stop = {"end_of_epoch": epoch_length, "second_epoch": epoch_length + 1}.get(stop, stop)
    run = f"stop-{stop}-{read_estimated_steps}"
    before, _ = fit(root, max_steps=stop, run=run)
    ckpt_path = root / run / f"step={stop}.ckpt"
    after, _ = fit(root, 8, f"{run}-resumed", ckpt_path=ckpt_path, read_estimated_steps=read_estimated_steps)
    assert_same_batches(before + after, full)
    assert len(after) == 8 - stop


def test_reloaded_train_loader_goes_on_with_the_trainer_epoch(small_run: tuple[Path, list[torch.Tensor], int]) -> None:
    root, _, epoch_length = small_run
    steps = 3 * epoch_length  # a fresh loader each epoch; Lightning calls iter() on it twice
    plain, _ = fit(root, max_steps=steps, run="plain")
    reloaded, _ = fit(root, max_steps=steps, run="reloaded", reload_dataloaders_every_n_epochs=1)
    assert_same_batches(reloaded, plain)
    assert not torch.equal(plain[0], plain[epoch_length])  # and the epochs do differ


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_lightning_resume_with_workers(small_run: tuple[Path, list[torch.Tensor], int]) -> None:
    root, full, _ = small_run
    before, _ = fit(root, max_steps=3, run="workers", num_workers=2)
    after, _ = fit(root, 8, "workers-resumed", ckpt_path=root / "workers" / "step=3.ckpt", num_workers=2)
    assert_same_batches(before + after, full)
