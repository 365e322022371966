"""Tests for data preparation (gptlit.data.prepare, gptlit.data.store): up to date or redone, checksums, crashes, bad
inputs."""

import json
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import make_stories
from helpers import (
    copy_prepared,
    decoded_split,
    make_dm,
    swap_ids,
    write_stories,
)

from gptlit.data import prepare as prepare_module
from gptlit.data.datamodule import DataError, token_dtype
from gptlit.data.sources import TXT_SEPARATOR
from gptlit.data.tokenizer import BOS_ID, EOS_ID, Tokenizer, train_tokenizer

# Up to date, or prepared again ----------------------------------------------------------------------


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
