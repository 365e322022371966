"""Tests for data preparation (gptlit.data.prepare, gptlit.data.sources) and loading (gptlit.data.datamodule)."""

import json
import os
import shutil
import socket
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import make_stories
from helpers import make_dm, run_cli, swap_ids, write_config, write_fineweb_like, write_stories

from gptlit.data import prepare as prepare_module
from gptlit.data import sources
from gptlit.data.datamodule import DataError, token_dtype
from gptlit.data.options import READING_OPTIONS, DataOptions
from gptlit.data.sources import TXT_SEPARATOR, check_hub_reachable
from gptlit.data.tokenizer import BOS_ID, EOS_ID, Tokenizer, train_tokenizer

# Helpers -------------------------------------------------------------------------------------------


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


def copy_prepared(prepared: Path, tmp_path: Path) -> Path:
    shutil.copytree(prepared / "data", tmp_path / "data")
    return tmp_path / "data"


# Sources and preparation ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "json", "parquet", "txt_directory", "jsonl_directory", "glob"])
def test_every_format_round_trips(tmp_path: Path, stories: list[str], fmt: str) -> None:
    if fmt.endswith("directory") or fmt == "glob":
        suffix = fmt.split("_")[0] if fmt != "glob" else "txt"
        (tmp_path / "corpus").mkdir()
        write_stories(tmp_path / "corpus" / f"part-a.{suffix}", stories[:150], suffix)
        write_stories(tmp_path / "corpus" / f"part-b.{suffix}", stories[150:], suffix)
        (tmp_path / "corpus" / "README.md").write_text("not a story")
        source = tmp_path / "corpus" / "*.txt" if fmt == "glob" else tmp_path / "corpus"
    else:
        source = write_stories(tmp_path / f"stories.{fmt}", stories, fmt)
    make_dm(tmp_path / "data", source).prepare_data()
    train, val = decoded_split(tmp_path / "data", "train"), decoded_split(tmp_path / "data", "val")
    assert_split_of(train, val, stories)
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["settings"]["hold_out"] == {"val_fraction": 0.05, "seed": 1337}
    assert meta["dtype"] == "uint16" and meta["vocab_size"] <= 400


def test_held_out_stories_depend_on_seed_only(tmp_path: Path, stories: list[str]) -> None:
    corpus = write_stories(tmp_path / "stories.jsonl", stories, "jsonl")
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
        write_stories(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet", train, "parquet")
        write_stories(tmp_path / "repo" / "data" / "validation-00000-of-00001.parquet", val, "parquet")
    else:
        (tmp_path / "repo").mkdir()
        write_stories(tmp_path / "repo" / "TinyStories-train.txt", train, "txt")
        write_stories(tmp_path / "repo" / "TinyStories-valid.txt", val, "txt")
    make_dm(tmp_path / "data", tmp_path / "repo").prepare_data()
    assert decoded_split(tmp_path / "data", "train") == train
    assert decoded_split(tmp_path / "data", "val") == val
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["settings"]["hold_out"] is None


def test_records_with_another_text_field_prepare_and_train(workdir: Path, stories: list[str]) -> None:
    write_stories(workdir / "stories.jsonl", stories, "jsonl", field="story")
    config = write_config(workdir, max_steps=4)
    run_cli("fit", "--config", str(config), "--data.source", "stories.jsonl", "--data.text_field", "story")
    assert_split_of(decoded_split(workdir / "data", "train"), decoded_split(workdir / "data", "val"), stories)
    assert json.loads((workdir / "data" / "meta.json").read_text())["settings"]["text_field"] == "story"
    assert (workdir / "lightning_logs" / "run" / "checkpoints" / "last.ckpt").is_file()


def test_a_repository_is_read_by_configuration_name(
    tmp_path: Path, stories: list[str], capsys: pytest.CaptureFixture
) -> None:
    """A local copy of a FineWeb-Edu-like repository: README.md declares the configurations, only a train split."""
    repo = write_fineweb_like(tmp_path / "fineweb-edu", sample=stories[:200], other=stories[200:])
    make_dm(tmp_path / "data", repo, config_name="sample-10BT", val_split=None).prepare_data()
    assert_split_of(decoded_split(tmp_path / "data", "train"), decoded_split(tmp_path / "data", "val"), stories[:200])
    settings = json.loads((tmp_path / "data" / "meta.json").read_text())["settings"]
    assert (settings["config_name"], settings["val_split"]) == ("sample-10BT", None)
    assert settings["hold_out"] == {"val_fraction": 0.05, "seed": 1337}
    # Back to the default configuration, which holds the other stories: prepared again, from those.
    make_dm(tmp_path / "data", repo, val_split=None).prepare_data()
    assert "(config_name changed)" in capsys.readouterr().err
    assert_split_of(decoded_split(tmp_path / "data", "train"), decoded_split(tmp_path / "data", "val"), stories[200:])


def test_hub_sources_pass_the_options_and_need_their_validation_split(tmp_path: Path, stories: list[str]) -> None:
    """The hub id's code path, on a local repository, which ``datasets.load_dataset`` reads as it reads a hub id."""
    repo = str(write_fineweb_like(tmp_path / "fineweb-edu", sample=stories[:200], other=stories[200:]))
    hub = sources._hub_source(repo, DataOptions(repo, config_name="sample-10BT"))
    with pytest.raises(DataError, match=r"no split 'validation' \(splits: 'train'\); set --data\.val_split .* null"):
        hub.splits()
    hub = sources._hub_source(repo, DataOptions(repo, config_name="sample-10BT", val_split=None))
    pairs = list(hub.stories(val_fraction=0.05, seed=1))
    assert_split_of(
        [s for split, s in pairs if split == "train"], [s for split, s in pairs if split == "val"], stories[:200]
    )


@pytest.mark.parametrize(
    "options, message",
    [
        (
            dict(text_field="title"),
            r"stories\.jsonl: records have no 'title' field \(fields: id, story\); set --data\.text_",
        ),
        (
            dict(config_name="sample-100BT"),
            r"fineweb-edu has no configuration 'sample-100BT' \(configurations: default, sample-10BT\); set --data",
        ),
        (
            dict(config_name="sample-10BT", val_split="test"),
            r"no split 'test' \(splits: 'train'\); set --data\.val_split",
        ),
        (
            dict(train_split="train_sft"),
            r"stories\.jsonl: no split 'train_sft' \(splits: 'train'\); set --data\.train_split",
        ),
        (
            dict(config_name="sample-10BT", text_field="story"),
            r"stories\.jsonl: --data\.config_name applies to a hub data set",
        ),
        (dict(val_split="train"), r"train_split and val_split are both 'train'"),
    ],
    ids=["text_field", "config_name", "val_split", "train_split", "config_name of a file", "the same split twice"],
)
def test_reading_options_that_do_not_fit_the_source(
    tmp_path: Path, stories: list[str], options: dict, message: str
) -> None:
    """One line that names what the source has, before anything is written."""
    source = write_stories(tmp_path / "stories.jsonl", stories, "jsonl", field="story")
    if "config_name" in options and "text_field" not in options:
        source = write_fineweb_like(tmp_path / "fineweb-edu", sample=stories[:200], other=stories[200:])
    with pytest.raises(DataError, match=message) as caught:
        make_dm(tmp_path / "data", source, **options).prepare_data()
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "data").exists() or not list((tmp_path / "data").iterdir())


def test_a_repository_without_a_default_configuration_needs_one_named(tmp_path: Path, stories: list[str]) -> None:
    repo = write_fineweb_like(tmp_path / "fineweb-edu", sample=stories[:200], other=stories[200:])
    readme = (repo / "README.md").read_text().replace("config_name: default", "config_name: CC-MAIN-2024-10")
    (repo / "README.md").write_text(readme)
    message = r"fineweb-edu needs a configuration \(configurations: CC-MAIN-2024-10, sample-10BT\); set --data\.config"
    with pytest.raises(DataError, match=message):
        make_dm(tmp_path / "data", repo, val_split=None).prepare_data()


def test_data_prepared_before_the_reading_options_stays_up_to_date(
    prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """gptlit 0.2.0's meta.json records no reading options: at their defaults, spelled out, nothing is redone."""
    data_dir = copy_prepared(prepared, tmp_path)
    assert not set(json.loads((data_dir / "meta.json").read_text())["settings"]) & set(READING_OPTIONS)
    stamps = {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir()}
    defaults = dict(config_name=None, text_field="text", train_split="train", val_split="validation")
    make_dm(data_dir, prepared / "stories.txt", **defaults).prepare_data()
    assert "up to date" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in data_dir.iterdir()} == stamps


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
    proxies = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", *proxies):
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
    def hang(*args, **kwargs):
        time.sleep(30)
        raise TimeoutError("timed out")  # as a real connection that never answers ends, after the test

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.monotonic()
    with pytest.raises(DataError, match=r"no answer within 0\.2 s"):
        check_hub_reachable("roneneldan/TinyStories", timeout=0.2)
    assert time.monotonic() - start < 2


@pytest.mark.usefixtures("online")
def test_hosts_exempt_from_the_proxy_are_reached_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.create_server(("127.0.0.1", 0)) as hub:
        monkeypatch.setenv("HF_ENDPOINT", f"https://127.0.0.1:{hub.getsockname()[1]}")
        monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # nothing listens on the discard port
        monkeypatch.setenv("no_proxy", "localhost,127.0.0.1")
        check_hub_reachable("roneneldan/TinyStories", timeout=1.0)  # straight to the hub, which answers
        monkeypatch.delenv("no_proxy")
        with pytest.raises(DataError, match="cannot be reached"):
            check_hub_reachable("roneneldan/TinyStories", timeout=1.0)  # through the proxy, which does not


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
    other = write_stories(tmp_path / "other.txt", make_stories(200, seed=1), "txt")
    make_dm(data_dir, other, vocab_size=320).prepare_data()
    assert "(source, source_fingerprint changed)" in capsys.readouterr().err
    new_meta = json.loads((data_dir / "meta.json").read_text())
    assert new_meta["settings"]["tokenizer_sha256"] == meta["settings"]["tokenizer_sha256"]
    assert len(decoded_split(data_dir, "train")) + len(decoded_split(data_dir, "val")) == 200


def test_a_tokenizer_no_meta_vouches_for_is_never_up_to_date_for_another_size(prepared: Path, tmp_path: Path) -> None:
    """A tokenizer.json with no record of its training (put there by hand, or its meta.json lost to a cut-short
    preparation) and another vocab_size than asked: refused, not reused as "up to date"."""
    data_dir = copy_prepared(prepared, tmp_path)
    meta = json.loads((data_dir / "meta.json").read_text())
    meta["settings"]["tokenizer_trained_with"] = None
    (data_dir / "meta.json").write_text(json.dumps(meta))
    before = {p.name: p.read_bytes() for p in data_dir.iterdir()}
    with pytest.raises(
        DataError, match=r"tokenizer\.json has \d+ tokens, not vocab_size=320, and no meta\.json records"
    ):
        make_dm(data_dir, prepared / "stories.txt", vocab_size=320).prepare_data()
    assert {p.name: p.read_bytes() for p in data_dir.iterdir()} == before
    (data_dir / "meta.json").unlink()
    with pytest.raises(DataError, match=r"not vocab_size=320"):
        make_dm(data_dir, prepared / "stories.txt", vocab_size=320).prepare_data()


def test_checksums_are_those_of_the_written_files(prepared: Path, tmp_path: Path, monkeypatch) -> None:
    """Computed while the ids stream out, in batches that straddle the pieces' boundaries."""
    monkeypatch.setattr(prepare_module, "ENCODE_BATCH_STORIES", 16)
    monkeypatch.setattr(prepare_module, "CHECKSUM_CHUNK_BYTES", 100)
    make_dm(tmp_path / "data", prepared / "stories.txt").prepare_data()
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["crc32_chunk_bytes"] == 100
    for split in ("train", "val"):
        data = (tmp_path / "data" / f"{split}.bin").read_bytes()
        assert meta["splits"][split]["crc32"] == [zlib.crc32(data[i : i + 100]) for i in range(0, len(data), 100)]


def test_ids_swapped_for_other_valid_ids_are_refused(prepared: Path, tmp_path: Path) -> None:
    data_dir = copy_prepared(prepared, tmp_path)
    swap_ids(data_dir / "train.bin")
    with pytest.raises(DataError, match=r"train\.bin has changed since it was prepared .*re-prepare it: delete"):
        make_dm(data_dir, prepared / "stories.txt").setup("fit")
    # A meta.json of before the checksums: checked for ids only, as then.
    meta = json.loads((data_dir / "meta.json").read_text())
    for split in ("train", "val"):
        del meta["splits"][split]["crc32"]
    del meta["crc32_chunk_bytes"]
    (data_dir / "meta.json").write_text(json.dumps(meta))
    make_dm(data_dir, prepared / "stories.txt").setup("fit")


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
    other = write_stories(tmp_path / "other.txt", make_stories(200, seed=1), "txt")
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
