"""Tests for data preparation (gptlit.prepare, gptlit.sources) and loading (gptlit.data)."""

import json
import os
import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_stories
from lightning.pytorch.callbacks import ModelCheckpoint

from gptlit import prepare as prepare_module
from gptlit.data import (
    DataError,
    ResumableDataLoader,
    TinyStoriesDataModule,
    TokenWindows,
    WindowSampler,
    token_dtype,
)
from gptlit.sources import TXT_SEPARATOR, check_hub_reachable
from gptlit.tokenizer import BOS_ID, EOS_ID, Tokenizer, train_tokenizer

# Helpers -------------------------------------------------------------------------------------------


def write_corpus(path: Path, stories: list[str], fmt: str) -> Path:
    """Write ``stories`` as ``fmt`` with padding and blank stories mixed in, which preparation must undo."""
    messy: list[str] = []
    for i, story in enumerate(stories):
        messy.append(f"  {story}\n\n" if i % 3 == 0 else story)
        if i % 40 == 0:
            messy.append("  \n ")
    if fmt == "txt":  # the official layout; the last story has no separator after it
        path.write_text("".join(f"{s}\n{TXT_SEPARATOR}\n" for s in messy[:-1]) + messy[-1], encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"id": i, "text": s}) + "\n" for i, s in enumerate(messy)), "utf-8")
    elif fmt == "json":
        path.write_text(json.dumps([{"text": s} for s in messy]), encoding="utf-8")
    elif fmt == "parquet":
        pq.write_table(pa.table({"text": messy}), path)
    return path


def make_dm(data_dir: Path, source: Path | str, **kwargs) -> TinyStoriesDataModule:
    settings = {"vocab_size": 400, "block_size": 32, "batch_size": 4, "val_fraction": 0.05, **kwargs}
    return TinyStoriesDataModule(source=str(source), data_dir=str(data_dir), **settings)


def decoded_split(data_dir: Path, split: str) -> list[str]:
    """The stories in ``{split}.bin``, checking the ``<bos>``/``<eos>`` frame and meta.json's counts on the way."""
    meta = json.loads((data_dir / "meta.json").read_text())
    tokens = np.fromfile(data_dir / f"{split}.bin", dtype=meta["dtype"])
    offsets = np.load(data_dir / f"{split}_offsets.npy")
    tokenizer = Tokenizer.from_file(data_dir / "tokenizer.json")
    counts = meta["splits"][split]
    assert (len(tokens), len(offsets)) == (counts["tokens"], counts["stories"])
    stories = []
    for start, end in zip(offsets, [*offsets[1:], len(tokens)], strict=True):
        ids = tokens[start:end].tolist()
        assert ids[0] == BOS_ID and ids[-1] == EOS_ID and BOS_ID not in ids[1:-1] and EOS_ID not in ids[1:-1]
        stories.append(tokenizer.decode(ids[1:-1], skip_special_tokens=False))
    assert counts["text_bytes"] == sum(len(s.encode("utf-8")) for s in stories)
    return stories


def assert_split_of(train: list[str], val: list[str], expected: list[str]) -> None:
    """``train`` and ``val`` together are ``expected``, each in corpus order, and val is not empty."""
    assert sorted(train + val) == sorted(expected)
    for split in (train, val):
        positions = [expected.index(s) for s in split]
        assert positions == sorted(positions)
    assert len(val) >= 1


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir prepared once from 300 stories (vocab 400); copy it before changing it."""
    root = tmp_path_factory.mktemp("prepared")
    corpus = write_corpus(root / "stories.txt", make_stories(300), "txt")
    make_dm(root / "data", corpus).prepare_data()
    return root


def copy_prepared(prepared: Path, tmp_path: Path) -> Path:
    shutil.copytree(prepared / "data", tmp_path / "data")
    return tmp_path / "data"


# Sources and preparation ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "json", "parquet", "txt_directory", "jsonl_directory", "glob"])
def test_every_format_round_trips(tmp_path: Path, stories: list[str], fmt: str) -> None:
    if fmt.endswith("directory") or fmt == "glob":
        suffix = fmt.split("_")[0] if fmt != "glob" else "txt"
        (tmp_path / "corpus").mkdir()
        write_corpus(tmp_path / "corpus" / f"part-a.{suffix}", stories[:150], suffix)
        write_corpus(tmp_path / "corpus" / f"part-b.{suffix}", stories[150:], suffix)
        (tmp_path / "corpus" / "README.md").write_text("not a story")
        source = tmp_path / "corpus" / "*.txt" if fmt == "glob" else tmp_path / "corpus"
    else:
        source = write_corpus(tmp_path / f"stories.{fmt}", stories, fmt)
    make_dm(tmp_path / "data", source).prepare_data()
    train, val = decoded_split(tmp_path / "data", "train"), decoded_split(tmp_path / "data", "val")
    assert_split_of(train, val, stories)
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["settings"]["hold_out"] == {"val_fraction": 0.05, "seed": 1337}
    assert meta["dtype"] == "uint16" and meta["vocab_size"] <= 400


def test_held_out_stories_depend_on_seed_only(tmp_path: Path, stories: list[str]) -> None:
    corpus = write_corpus(tmp_path / "stories.jsonl", stories, "jsonl")
    val = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        make_dm(tmp_path / name, corpus, seed=seed).prepare_data()
        val[name] = decoded_split(tmp_path / name, "val")
    assert val["a"] == val["b"] != val["c"]
    assert 0.01 < len(val["a"]) / len(stories) < 0.15  # about val_fraction = 0.05


@pytest.mark.parametrize("layout", ["parquet", "txt"])
def test_directory_with_its_own_splits_keeps_them(tmp_path: Path, stories: list[str], layout: str) -> None:
    """A folder laid out like a hub repository (parquet: through load_dataset, the hub id's code path)."""
    train, val = stories[:250], stories[250:]
    if layout == "parquet":
        (tmp_path / "repo" / "data").mkdir(parents=True)
        write_corpus(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet", train, "parquet")
        write_corpus(tmp_path / "repo" / "data" / "validation-00000-of-00001.parquet", val, "parquet")
    else:
        (tmp_path / "repo").mkdir()
        write_corpus(tmp_path / "repo" / "TinyStories-train.txt", train, "txt")
        write_corpus(tmp_path / "repo" / "TinyStories-valid.txt", val, "txt")
    make_dm(tmp_path / "data", tmp_path / "repo").prepare_data()
    assert decoded_split(tmp_path / "data", "train") == train
    assert decoded_split(tmp_path / "data", "val") == val
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["settings"]["hold_out"] is None


def test_offline_hub_fails_fast_with_a_pointer_to_local_files(tmp_path: Path) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # set by conftest before datasets was imported
    start = time.monotonic()
    with pytest.raises(DataError, match=r"HF_HUB_OFFLINE.*--data\.source path/to/TinyStories-train\.txt"):
        make_dm(tmp_path / "data", "roneneldan/TinyStories").prepare_data()
    assert time.monotonic() - start < 5
    assert not (tmp_path / "data").exists()


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE unset, no proxy, and datasets must not be asked: the connectivity check answers first."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("datasets.load_dataset was called for an unreachable hub")

    monkeypatch.setattr("datasets.load_dataset", no_download)


@pytest.mark.usefixtures("online")
def test_unreachable_hub_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.monotonic()
    with pytest.raises(DataError, match=r"http://127\.0\.0\.1:9 cannot be reached.*--data\.source"):
        make_dm(tmp_path / "data", "roneneldan/TinyStories").prepare_data()
    assert time.monotonic() - start < 5


@pytest.mark.usefixtures("online")
def test_hanging_hub_is_cut_off_by_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: time.sleep(30))
    start = time.monotonic()
    with pytest.raises(DataError, match=r"no answer within 0\.2 s"):
        check_hub_reachable("roneneldan/TinyStories", timeout=0.2)
    assert time.monotonic() - start < 2


def test_prepared_hub_data_needs_no_network(prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Prepared once online, a hub source is up to date offline: the check never opens the source."""
    data_dir = copy_prepared(prepared, tmp_path)
    meta = json.loads((data_dir / "meta.json").read_text())
    hub = "roneneldan/TinyStories"
    meta["settings"].update(source=hub, source_fingerprint=[hub], hold_out=None)
    (data_dir / "meta.json").write_text(json.dumps(meta))
    make_dm(data_dir, hub).prepare_data()  # HF_HUB_OFFLINE=1: would raise if it tried the hub
    assert "up to date" in capsys.readouterr().err


def test_second_run_with_same_settings_does_nothing(
    prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data_dir = copy_prepared(prepared, tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir()}
    make_dm(data_dir, prepared / "stories.txt").prepare_data()
    assert "up to date" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir()} == stamps


def test_changed_settings_prepare_again(prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data_dir = copy_prepared(prepared, tmp_path)
    make_dm(data_dir, prepared / "stories.txt", vocab_size=320).prepare_data()
    assert "retraining" in capsys.readouterr().err
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["vocab_size"] == Tokenizer.from_file(data_dir / "tokenizer.json").vocab_size <= 320
    # Another source with the same tokenizer: re-encoded, tokenizer kept.
    other = write_corpus(tmp_path / "other.txt", make_stories(200, seed=1), "txt")
    make_dm(data_dir, other, vocab_size=320).prepare_data()
    assert "(source, source_fingerprint changed)" in capsys.readouterr().err
    new_meta = json.loads((data_dir / "meta.json").read_text())
    assert new_meta["settings"]["tokenizer_sha256"] == meta["settings"]["tokenizer_sha256"]
    assert len(decoded_split(data_dir, "train")) + len(decoded_split(data_dir, "val")) == 200


def _crash_on(monkeypatch: pytest.MonkeyPatch, target: object, name: str, after: int) -> None:
    """Make ``target.name`` raise on its call number ``after + 1``, as if the process were killed there."""
    original, calls = getattr(target, name), []

    def crashing(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) > after:
            raise KeyboardInterrupt("simulated kill")
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, crashing)


@pytest.mark.parametrize("crash_point", ["encoding", "renaming"])
def test_killed_run_leaves_no_accepted_half_set(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_point: str
) -> None:
    corpus = prepared / "stories.txt"
    with monkeypatch.context() as patch:
        if crash_point == "encoding":
            patch.setattr(prepare_module, "ENCODE_BATCH_STORIES", 16)
            _crash_on(patch, prepare_module._SplitWriter, "write", after=5)
        else:
            _crash_on(patch, prepare_module.os, "replace", after=2)  # train.bin and val.bin are in place
        with pytest.raises(KeyboardInterrupt):
            make_dm(tmp_path / "data", corpus).prepare_data()
    with pytest.raises(DataError, match=r"meta\.json not found"):
        make_dm(tmp_path / "data", corpus).setup("fit")
    (tmp_path / "data" / "val.bin.tmp").write_bytes(b"\0" * 7)  # what a SIGKILL would leave behind
    make_dm(tmp_path / "data", corpus).prepare_data()
    for name in ("train.bin", "val.bin", "train_offsets.npy", "val_offsets.npy", "tokenizer.json"):
        assert (tmp_path / "data" / name).read_bytes() == (prepared / "data" / name).read_bytes(), name
    assert not list((tmp_path / "data").glob("*.tmp"))


@pytest.mark.parametrize("crash_point", ["encoding", "renaming"])
def test_killed_rerun_keeps_the_previous_set_or_none(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_point: str
) -> None:
    data_dir = copy_prepared(prepared, tmp_path)
    other = write_corpus(tmp_path / "other.txt", make_stories(200, seed=1), "txt")
    with monkeypatch.context() as patch:
        if crash_point == "encoding":
            _crash_on(patch, prepare_module._SplitWriter, "write", after=1)
        else:
            _crash_on(patch, prepare_module.os, "replace", after=1)  # the new train.bin is in place
        with pytest.raises(KeyboardInterrupt):
            make_dm(data_dir, other).prepare_data()
    dm = make_dm(data_dir, prepared / "stories.txt")
    if crash_point == "encoding":
        dm.setup("fit")  # the old set is intact and accepted
        assert dm.meta == json.loads((prepared / "data" / "meta.json").read_text())
    else:
        with pytest.raises(DataError, match=r"meta\.json not found"):
            dm.setup("fit")


def test_uint32_above_65535_ids() -> None:
    assert token_dtype(400) == np.uint16
    assert token_dtype(65_535) == np.uint16
    assert token_dtype(65_536) == np.uint32
    assert token_dtype(70_000) == np.uint32


def test_an_id_too_big_for_the_dtype_raises_instead_of_wrapping(tmp_path: Path) -> None:
    writer = prepare_module._SplitWriter(tmp_path, "train", np.dtype(np.uint16))
    with pytest.raises(OverflowError):
        writer.write(["a story"], [[BOS_ID, 70_000, EOS_ID]])
    writer.close()


# Bad inputs ----------------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing\.txt: no such file"):
        make_dm(tmp_path / "data", tmp_path / "missing.txt").prepare_data()


def test_empty_corpus(tmp_path: Path) -> None:
    corpus = tmp_path / "empty.txt"
    corpus.write_text(f"\n  \n{TXT_SEPARATOR}\n\n{TXT_SEPARATOR}\n")
    with pytest.raises(DataError, match=r"empty\.txt: no train stories"):
        make_dm(tmp_path / "data", corpus).prepare_data()
    assert not list((tmp_path / "data").iterdir())


def test_jsonl_without_text_field(tmp_path: Path) -> None:
    corpus = tmp_path / "stories.jsonl"
    corpus.write_text('{"story": "Once upon a time."}\n')
    with pytest.raises(DataError, match=r"stories\.jsonl: records have no 'text' field \(fields: story\)"):
        make_dm(tmp_path / "data", corpus).prepare_data()


def test_truncated_bin(prepared: Path, tmp_path: Path) -> None:
    data_dir = copy_prepared(prepared, tmp_path)
    with open(data_dir / "train.bin", "r+b") as f:
        f.truncate(f.seek(0, os.SEEK_END) - 1)
    with pytest.raises(DataError, match=r"train\.bin is truncated.*delete"):
        make_dm(data_dir, prepared / "stories.txt").setup("fit")
    # Not left by a kill (meta.json is written last), so neither reused nor silently overwritten.
    truncated = (data_dir / "train.bin").read_bytes()
    with pytest.raises(DataError, match=r"train\.bin is truncated.*delete"):
        make_dm(data_dir, prepared / "stories.txt").prepare_data()
    assert (data_dir / "train.bin").read_bytes() == truncated


def test_ids_beyond_the_vocabulary(prepared: Path, tmp_path: Path) -> None:
    data_dir = copy_prepared(prepared, tmp_path)
    tokens = np.memmap(data_dir / "val.bin", dtype=np.uint16, mode="r+")
    tokens[len(tokens) // 2] = 60_000
    tokens.flush()
    del tokens
    with pytest.raises(DataError, match=r"val\.bin holds token id 60000"):
        make_dm(data_dir, prepared / "stories.txt").setup("validate")


def test_meta_of_another_version(prepared: Path, tmp_path: Path) -> None:
    data_dir = copy_prepared(prepared, tmp_path)
    meta = json.loads((data_dir / "meta.json").read_text())
    (data_dir / "meta.json").write_text(json.dumps({**meta, "format_version": 0}))
    with pytest.raises(DataError, match=r"meta\.json has format version 0"):
        make_dm(data_dir, prepared / "stories.txt").setup("fit")


def test_block_size_larger_than_the_val_split(prepared: Path) -> None:
    val_tokens = json.loads((prepared / "data" / "meta.json").read_text())["splits"]["val"]["tokens"]
    with pytest.raises(DataError, match=r"val\.bin has \d+ tokens, fewer than block_size \+ 1"):
        make_dm(prepared / "data", prepared / "stories.txt", block_size=val_tokens).setup("fit")


def test_vocab_size_from_the_tokenizer(prepared: Path, tmp_path: Path) -> None:
    dm = make_dm(prepared / "data", prepared / "stories.txt", vocab_size=None)
    assert dm.vocab_size == Tokenizer.from_file(prepared / "data" / "tokenizer.json").vocab_size
    with pytest.raises(DataError, match=r"tokenizer\.json, which does not exist"):
        _ = make_dm(tmp_path / "data", prepared / "stories.txt", vocab_size=None).vocab_size


def test_tokenizer_larger_than_vocab_size(prepared: Path, tmp_path: Path) -> None:
    tokenizer = train_tokenizer(make_stories(300), vocab_size=400)
    tokenizer.save(tmp_path / "big.json")
    with pytest.raises(DataError, match=r"big\.json has \d+ tokens, more than vocab_size=300"):
        make_dm(
            tmp_path / "data", prepared / "stories.txt", tokenizer_path=tmp_path / "big.json", vocab_size=300
        ).prepare_data()


def test_read_only_data_dir(prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run as root, whom chmod does not stop: the refusal a read-only file system gives is simulated."""

    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(DataError, match=r"cannot write .*data: Permission denied; .*writable --data\.data_dir"):
        make_dm(tmp_path / "data", prepared / "stories.txt").prepare_data()


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
    write_corpus(root / "stories.txt", make_stories(80), "txt")
    full, epoch_length = fit(root, max_steps=8, run="full")
    assert 2 <= epoch_length <= 6  # the 8 steps cross an epoch boundary
    return root, full, epoch_length


def assert_same_batches(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want, strict=True), start=1):
        assert torch.equal(a, b), f"batch {step} differs"


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
def test_lightning_resume_with_workers(small_run: tuple[Path, list[torch.Tensor], int]) -> None:
    root, full, _ = small_run
    before, _ = fit(root, max_steps=3, run="workers", num_workers=2)
    after, _ = fit(root, 8, "workers-resumed", ckpt_path=root / "workers" / "step=3.ckpt", num_workers=2)
    assert_same_batches(before + after, full)
