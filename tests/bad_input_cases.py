"""The workspaces of tests/test_bad_inputs.py's rows: a Case (one row), and what each row does to its copy of
the workspace before it runs, or checks after."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from conftest import make_stories
from helpers import swap_ids, write_fineweb_like, write_stories

from gptlit.data.tokenizer import train_tokenizer


@dataclass(frozen=True)
class Case:
    """One bad input: what to set up, the command, and what the user must see."""

    name: str
    command: str  # after `python -m gptlit`, shell-quoted, run in the workspace copy
    message: str  # in the last stderr line (the error), or at the start of stdout when code is 0
    code: int = 1
    setup: Callable[[Path], None] | None = None
    check: Callable[[Path], None] | None = None  # more assertions on the workspace copy afterwards
    runs_here: bool = True  # False: skipped on this machine


# Setups: each changes the workspace copy it is given ----------------------------------------------------


def edit_config(old: str, new: str) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        (ws / "bad.yaml").write_text((ws / "run.yaml").read_text().replace(old, new))

    return setup


def write_empty_corpus(ws: Path) -> None:
    (ws / "empty.txt").write_text("\n  \n<|endoftext|>\n\n<|endoftext|>\n")


def truncate_train_bin(ws: Path) -> None:
    with open(ws / "data" / "train.bin", "r+b") as f:
        f.truncate(f.seek(0, os.SEEK_END) - 1)  # an odd byte count: not whole uint16 ids


def put_id_beyond_vocab(ws: Path) -> None:
    tokens = np.memmap(ws / "data" / "val.bin", dtype=np.uint16, mode="r+")
    tokens[len(tokens) // 2] = 400  # the vocabulary has 320
    tokens.flush()


def swap_valid_ids(ws: Path) -> None:
    swap_ids(ws / "data" / "train.bin")


def set_meta_version(ws: Path) -> None:
    meta = json.loads((ws / "data" / "meta.json").read_text())
    (ws / "data" / "meta.json").write_text(json.dumps({**meta, "format_version": 0}))


def write_other_tokenizer(ws: Path) -> None:
    train_tokenizer(make_stories(300, seed=5), vocab_size=320).save(ws / "other.json")


def remove_runs(ws: Path) -> None:
    shutil.rmtree(ws / "lightning_logs")


def nothing_started(ws: Path) -> None:
    assert not (ws / "lightning_logs").exists()


def write_config_of_no_run(ws: Path) -> None:
    shutil.copy(ws / "run.yaml", ws / "rnu.yaml")


def write_plain_ckpt(ws: Path) -> None:
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, ws / "plain.ckpt")


class RunsCode:
    """Unpickling this calls os.mkdir('pwned'): the stand-in for a malicious checkpoint's payload."""

    def __reduce__(self):
        return (os.mkdir, ("pwned",))


def write_unsafe_checkpoint(ws: Path) -> None:
    torch.save({"state_dict": {}, "gptlit": {}, "payload": RunsCode()}, ws / "evil.ckpt")


def payload_never_ran(ws: Path) -> None:
    assert not (ws / "pwned").exists()


def write_wide_vocabulary(ws: Path) -> None:
    """A tokenizer of 70,320 tokens and stories that use ids above 65,535."""
    tokenizer = train_tokenizer(make_stories(300), vocab_size=320)
    tokenizer.hf.add_tokens([f"<w{i}>" for i in range(70_000)])  # ids 320 .. 70,319
    tokenizer.save(ws / "wide.json")
    stories = [f"{story} <w{69_990 + i % 10}> <w{i}>" for i, story in enumerate(make_stories(400))]
    (ws / "wide.txt").write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories), encoding="utf-8")


def wide_ids_survive(ws: Path) -> None:
    meta = json.loads((ws / "wide" / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_320
    assert np.fromfile(ws / "wide" / "train.bin", dtype=np.uint32).max() == 70_319  # <w69999>
    saved = torch.load(ws / "lightning_logs" / "wide" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["gptlit"]["config"]["vocab_size"] == 70_320 and saved["global_step"] == 2


def point_at_dev_full(ws: Path) -> None:
    (ws / "full").mkdir()
    (ws / "full" / "train.bin.tmp").symlink_to("/dev/full")  # every write to it fails with ENOSPC


def write_story_records(ws: Path) -> None:
    write_stories(ws / "stories.jsonl", make_stories(20), "jsonl", field="story")


def write_fineweb_repository(ws: Path) -> None:
    write_fineweb_like(ws / "fineweb-edu", sample=make_stories(20), other=make_stories(20, seed=1))


def write_nan_checkpoint(ws: Path) -> None:
    """nan.ckpt: the run's last.ckpt with one NaN weight."""
    checkpoint = torch.load(ws / "lightning_logs" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["state_dict"]["model.blocks.1.mlp.fc.weight"][0, 0] = float("nan")
    torch.save(checkpoint, ws / "nan.ckpt")


def write_blocking_file(ws: Path) -> None:
    (ws / "blocker").write_text("a file where the data directory's parent should be")


def last_good_checkpoint_kept(ws: Path) -> None:
    saved = torch.load(ws / "lightning_logs" / "nan" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 8  # the checkpoint before the NaN step
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())


# The table -----------------------------------------------------------------------------------------------
