"""Checkpoints are never lost or poisoned: a diverged step is never saved, a full disk ends in one line that names
the file and the space it needs, and leaves no partial file and the previous checkpoints as they were."""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import run_cli, write_config

import gptlit.cli.main
from gptlit.checkpoint import describe_non_finite, read_checkpoint
from gptlit.errors import MissingFileError, UsageError
from gptlit.training.runs import find_checkpoint, resolve_checkpoint


def test_a_missing_checkpoint_is_one_error_wherever_it_is_asked_for(tmp_path: Path) -> None:
    """Reading a path, resolving one for fit/validate, finding one for sample/export, and a run's missing
    last/best/stable: each a MissingFileError that begins ``checkpoint not found: <path>``."""
    (tmp_path / "lightning_logs" / "run" / "checkpoints").mkdir(parents=True)
    missing = tmp_path / "missing.ckpt"
    attempts = {
        missing: [
            lambda: read_checkpoint(missing),
            lambda: resolve_checkpoint(str(missing), None),
            lambda: find_checkpoint(str(missing), tmp_path),
        ],
        **{
            tmp_path / "lightning_logs" / "run" / "checkpoints" / f"{alias}.ckpt": [
                lambda alias=alias: find_checkpoint(alias, tmp_path, "run")
            ]
            for alias in ("last", "best", "stable")
        },
    }
    for path, calls in attempts.items():
        for call in calls:
            with pytest.raises(MissingFileError, match=f"^checkpoint not found: {re.escape(str(path))}; "):
                call()


def test_non_finite_tensors_are_named_and_large_finite_ones_are_not() -> None:
    weights = {
        "big": torch.full((3,), 3e38),  # float32: a sum of squares would overflow, the largest magnitude does not
        "half": torch.tensor([65504.0, -1.0], dtype=torch.float16),
        "bad_half": torch.tensor([1.0, float("inf")], dtype=torch.bfloat16),
        "steps": torch.arange(3),  # integers: never NaN
        "empty": torch.empty(0),
        "bad": torch.tensor([[0.0, float("nan")]]),
    }
    state = {"exp_avg": torch.zeros(2), "exp_avg_sq": torch.tensor([float("-inf"), 0.0]), "step": torch.tensor(3.0)}
    checkpoint = {"state_dict": weights, "optimizer_states": [{"state": {0: state}, "param_groups": []}]}
    assert describe_non_finite(checkpoint) == (
        "2 of 4 weight tensors and 1 of 3 optimizer tensors hold NaN or inf "
        "(bad_half, bad, optimizer_states[0][0].exp_avg_sq)"
    )
    assert describe_non_finite(checkpoint, optimizer=False) == "2 of 4 weight tensors hold NaN or inf (bad_half, bad)"
    checkpoint["state_dict"] = {"fine": torch.ones(2)}
    assert describe_non_finite(checkpoint, optimizer=False) is None


def test_a_resumed_checkpoint_with_a_nan_optimizer_state_is_refused(tmp_path: Path) -> None:
    state = {"exp_avg": torch.tensor([float("nan")])}
    checkpoint = {"gptlit": {"format": 2, "config": {}}, "state_dict": {"model.w": torch.ones(2)}}
    torch.save({**checkpoint, "optimizer_states": [{"state": {0: state}, "param_groups": []}]}, tmp_path / "x.ckpt")
    assert read_checkpoint(tmp_path / "x.ckpt")["state_dict"].keys() == {"model.w"}  # enough to sample from
    with pytest.raises(UsageError, match=r"refusing to load .*x.ckpt: 0 of 1 weight tensors and 1 of 1 optimizer"):
        read_checkpoint(tmp_path / "x.ckpt", optimizer=True)  # not enough to resume from


def fail_line(capsys: pytest.CaptureFixture, *args: str) -> str:
    """The one error line of ``python -m gptlit *args``, run in this process, which must fail with exit code 1."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err, err[-3000:]
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("gptlit: error: "), last_line
    return last_line


def digests(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (hidden ones included) and a hash of its bytes."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.rglob("*")}


def all_finite(checkpoint: dict) -> bool:
    """Whether every weight and optimizer tensor of a checkpoint is finite."""
    states = [s for optimizer in checkpoint["optimizer_states"] for s in optimizer["state"].values()]
    tensors = [*checkpoint["state_dict"].values(), *(t for state in states for t in state.values())]
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def train_run(workdir: Path, max_steps: int = 8) -> Path:
    """``lightning_logs/run``: the tiny model trained ``max_steps`` steps (checkpoints every 4, validation at 8)."""
    run_cli("fit", "--config", str(write_config(workdir, max_steps=max_steps)))
    return workdir / "lightning_logs" / "run"


@pytest.mark.slow
def test_weights_that_turn_nan_are_never_saved(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    poison = {"class_path": "probes.PoisonGradientsAt", "init_args": {"step": 5}}  # NaN weights after step 5
    config = str(write_config(workdir))
    args = ["fit", "--config", config, "--model.optimizer", "muon", "--checkpoint.every_n_train_steps", "1"]
    line = fail_line(capsys, *args, "--trainer.callbacks+=" + json.dumps(poison))
    checkpoints = workdir / "lightning_logs" / "run" / "checkpoints"
    assert "training diverged at step 6: 28 of 28 weight tensors" in line, line
    assert f"the last good checkpoint, {checkpoints / 'last.ckpt'} (step 5)" in line, line
    saved = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 5 and all_finite(saved)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]  # nothing staged or partial left


def full_disk_save(obj, f, *args, **kwargs) -> None:
    """torch.save on a full disk: some bytes written, then the RuntimeError of its zip writer (no errno)."""
    f.write(b"\0" * 4096)
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4096")


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_ends_in_one_line(
    workdir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoints = train_run(workdir) / "checkpoints"
    before = digests(checkpoints)
    monkeypatch.setattr(torch, "save", full_disk_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=2**30, used=2**30, free=1000))
    line = fail_line(capsys, "fit", "--ckpt_path", "last", "--trainer.max_steps", "16")
    assert f"cannot write {checkpoints / 'last.ckpt'}: no space left on its disk" in line, line
    assert "it needs about 0.5 MiB, 0.0 MiB are free" in line, line
    assert digests(checkpoints) == before  # no partial file, both checkpoints as they were


def test_a_full_disk_anywhere_names_the_file(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    def write(filename: str) -> None:  # a writer whose OSError, raised on close, names no file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gptlit.cli.main, "_run", lambda args: write("runs/events.out.tfevents"))
    with pytest.raises(SystemExit):
        gptlit.cli.main.cli_main(["fit"])
    line = capsys.readouterr().err.strip()
    assert line.startswith("gptlit: error: No space left on device: runs/events.out.tfevents ("), line
    assert "MiB free there)" in line and "\n" not in line, line


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    """A 1 MiB tmpfs (skipped where it cannot be mounted: it needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True
    )
    if not mounted or mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.slow
def test_a_run_on_a_full_disk_resumes_to_one_line(
    workdir: Path, small_disk: Path, capsys: pytest.CaptureFixture
) -> None:
    run = train_run(workdir)
    shutil.copytree(run, small_disk / "lightning_logs" / "run")  # two checkpoints of 0.45 MiB: ~60 KiB free
    checkpoints = small_disk / "lightning_logs" / "run" / "checkpoints"
    before = digests(checkpoints)
    resume = ["fit", "--ckpt_path", "last", "--trainer.default_root_dir", str(small_disk), "--trainer.max_steps", "16"]
    line = fail_line(capsys, *resume)
    assert f"cannot write {checkpoints / 'last.ckpt'}: no space left on its disk (it needs about 0.5 MiB" in line
    assert digests(checkpoints) == before  # no partial file, both checkpoints as they were

    free = shutil.disk_usage(small_disk).free  # full to the last byte: not even the run's lock can be written
    (small_disk / "filler").write_bytes(b"\0" * free)
    line = fail_line(capsys, *resume)
    assert f"No space left on device: {small_disk / 'lightning_logs' / 'run' / '.lock'} (0.0 MiB free there)" in line
    assert digests(checkpoints) == before
