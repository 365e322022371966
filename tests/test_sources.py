"""Tests for sources (gptlit.data.sources, gptlit.data.options): formats, splits held out or kept, reading options,
the hub."""

import json
import os
import socket
import time
from pathlib import Path

import pytest
from helpers import (
    assert_split_of,
    copy_prepared,
    decoded_split,
    make_dm,
    run_cli,
    write_config,
    write_fineweb_like,
    write_stories,
)

from gptlit.data import sources
from gptlit.data.datamodule import DataError
from gptlit.data.options import READING_OPTIONS, DataOptions
from gptlit.data.sources import check_hub_reachable

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
