"""Crash tests: real processes killed with SIGKILL mid-training, mid-checkpoint and mid-preparation.

A killed run resumed with ``python -m gptlit fit --ckpt_path last`` ends with exactly the parameters of a run
never stopped (CPU, float32, dropout on); ``last.ckpt`` always loads; a killed preparation leaves the previous
complete data set or none, never a half-written file that is used.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import scalars, write_config, write_corpus
from preloaded import Preloaded

from gptlit.data.datamodule import DataError, TinyStoriesDataModule
from gptlit.data.options import DataOptions
from gptlit.data.prepare import prepare_dataset
from gptlit.training.runs import load_checkpoint

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
MAX_STEPS = 24  # batches of 64 windows: an epoch is 17 steps, so runs cross an epoch boundary


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def crash_config(root: Path, name: str, data: Path, every: int, optimizer: str = "adamw") -> Path:
    """The tiny model of test_train with dropout on (so the random state matters), checkpoints every ``every``."""
    path = write_config(root, name=name, max_steps=MAX_STEPS)
    config = yaml.safe_load(path.read_text())
    config["model"]["config"].update(dropout=0.1, embed_dim=64)
    config["model"]["optimizer"] = optimizer
    config["data"].update(source=str(data / "stories.txt"), data_dir=str(data / "data"), batch_size=64)
    config["checkpoint"]["every_n_train_steps"] = every
    path.write_text(yaml.safe_dump(config))
    (root / "data").rmdir()  # write_config's; the runs share the prepared one
    return path


@pytest.fixture(scope="module")
def preloaded() -> Preloaded:
    server = Preloaded(environment())
    yield server
    server.close()


@pytest.fixture(scope="module")
def crash_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("crash-data")
    write_corpus(data / "stories.txt")
    prepare_dataset(DataOptions(source=str(data / "stories.txt"), vocab_size=320), data / "data")
    return data


def train_straight(root: Path, crash_data: Path, preloaded: Preloaded, optimizer: str = "adamw") -> Path:
    """``lightning_logs/straight`` of a run that was never stopped."""
    config = crash_config(root, "straight", crash_data, every=4, optimizer=optimizer)
    assert preloaded.wait(preloaded.start(["fit", "--config", str(config)], root, root / "log")) == 0
    return root / "lightning_logs" / "straight"


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, crash_data: Path, preloaded: Preloaded) -> Path:
    return train_straight(tmp_path_factory.mktemp("straight"), crash_data, preloaded)


_steps: dict[tuple[str, int, int, int], int] = {}


def checkpoint_step(path: Path) -> int:
    """global_step of a checkpoint file, or -1 while there is none (it is always complete: renamed into place).

    Polled every few milliseconds, so a file is read only when it is a new one: a new inode, or a reused inode
    with other times (checkpoints are at least a training step apart).
    """
    try:
        stat = path.stat()
        key = (str(path), stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns)
        if key not in _steps:
            _steps[key] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]
        return _steps[key]
    except FileNotFoundError:
        return -1


def wait_for(condition, poll: float = 0.002, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll)


def wait_while_running(preloaded: Preloaded, pid: int, condition, log: Path) -> None:
    """Wait for ``condition``; fail with the process's log if it ends first."""

    def check() -> bool:
        code = preloaded.poll(pid)
        assert code is None, f"exited with {code}:\n{log.read_text()[-3000:]}"
        return condition()

    wait_for(check)


def run_and_kill(
    preloaded: Preloaded, args: list[str], cwd: Path, last: Path, partial: Path, mid_write: bool, delay: float
) -> None:
    """Start ``args``; once it has a checkpoint of its own, SIGKILL it: the moment the next checkpoint is being
    written (``mid_write``), or else ``delay`` seconds on or as the next checkpoint lands, whichever comes first."""
    before, log = checkpoint_step(last), cwd / "log"
    partial.unlink(missing_ok=True)  # the previous kill's
    pid = preloaded.start(args, cwd, log)
    wait_while_running(preloaded, pid, lambda: checkpoint_step(last) > before, log)
    if mid_write:
        wait_while_running(preloaded, pid, partial.exists, log)
    else:
        progressed, deadline = checkpoint_step(last), time.monotonic() + delay
        wait_while_running(
            preloaded, pid, lambda: time.monotonic() > deadline or checkpoint_step(last) > progressed, log
        )
    os.kill(pid, signal.SIGKILL)
    assert preloaded.wait(pid) == -signal.SIGKILL


def assert_same_training_state(got: Path, want: Path) -> None:
    a = torch.load(got, map_location="cpu", weights_only=True)
    b = torch.load(want, map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in b["state_dict"].items():
        assert torch.equal(a["state_dict"][name], tensor), name
    states_a, states_b = (c["optimizer_states"][0]["state"] for c in (a, b))
    assert states_a.keys() == states_b.keys()
    for index, state in states_b.items():
        assert state.keys() == states_a[index].keys()
        for key in state:  # AdamW's exp_avg, exp_avg_sq and step; Muon's momentum_buffer
            assert torch.equal(states_a[index][key], state[key]), (index, key)
    assert a["lr_schedulers"] == b["lr_schedulers"]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_kill_9_mid_training_resumes_exactly(
    tmp_path: Path, crash_data: Path, straight: Path, preloaded: Preloaded, optimizer: str
) -> None:
    """`python -m gptlit fit`, SIGKILL mid-epoch, `fit --ckpt_path last`: the run never stopped, to the bit."""
    if optimizer != "adamw":
        (tmp_path / "straight").mkdir()
        straight = train_straight(tmp_path / "straight", crash_data, preloaded, optimizer)
    config = crash_config(tmp_path, "cut", crash_data, every=4, optimizer=optimizer)
    last = tmp_path / "lightning_logs" / "cut" / "checkpoints" / "last.ckpt"
    with open(tmp_path / "log", "w") as log:
        fit = subprocess.Popen(
            [sys.executable, "-m", "gptlit", "fit", "--config", str(config)],
            cwd=tmp_path,
            env=environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        # Killed the moment the third checkpoint (step 12, mid-epoch) appears, before even reading it: the
        # hardest moment for the curve, since that step's metrics must already be in the event file.
        files: set[tuple[int, int]] = set()

        def third_checkpoint() -> bool:
            with contextlib.suppress(FileNotFoundError):
                stat = last.stat()  # each checkpoint is a new file renamed into place
                files.add((stat.st_ino, stat.st_mtime_ns))
            return len(files) == 3 or fit.poll() is not None

        wait_for(third_checkpoint, poll=0.0005)
        fit.send_signal(signal.SIGKILL)
        assert fit.wait() == -signal.SIGKILL
    assert checkpoint_step(last) == 12

    resumed = subprocess.run(
        [sys.executable, "-m", "gptlit", "fit", "--ckpt_path", "last"],  # no config: the run's own
        cwd=tmp_path,
        env=environment(),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    assert_same_training_state(last, straight / "checkpoints" / "last.ckpt")
    # One continuous TensorBoard curve: every step once, with the uninterrupted run's values.
    logged, expected = scalars(last.parents[1]), scalars(straight)
    assert [step for step, _ in logged["train/loss"]] == list(range(MAX_STEPS))
    assert logged["train/loss"] == expected["train/loss"]
    assert logged["val/loss"] == expected["val/loss"]


def test_sigterm_to_the_whole_job_stops_cleanly_and_resumes_exactly(
    tmp_path: Path, crash_data: Path, straight: Path
) -> None:
    """SIGTERM to the process group (SLURM, `timeout`, `docker stop`), DataLoader workers included: the run stops
    after the batch, with last.ckpt of that step and one line saying so, and the command that line gives (the
    run lives under another root directory) resumes it, in the same directory, to the uninterrupted run's state."""
    config = crash_config(tmp_path, "cut", crash_data, every=4)
    marker = tmp_path / "paused"
    pause = f'{{"class_path": "probes.WaitForSignalAt", "init_args": {{"step": 10, "marker": "{marker}"}}}}'
    args = ["--config", str(config), "--data.num_workers", "1", "--trainer.default_root_dir", "runs"]
    last = tmp_path / "runs" / "lightning_logs" / "cut" / "checkpoints" / "last.ckpt"
    fit = subprocess.Popen(
        [sys.executable, "-m", "gptlit", "fit", *args, f"--trainer.callbacks+={pause}"],
        cwd=tmp_path,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a job's
    )
    wait_for(lambda: marker.exists() or fit.poll() is not None)
    seen = checkpoint_step(last)
    os.killpg(fit.pid, signal.SIGTERM)
    out, err = fit.communicate(timeout=120)
    assert fit.returncode == 130, err[-3000:]
    assert "Traceback" not in out + err and "killed by signal" not in err, err[-3000:]
    stopped = re.findall(r"^gptlit: stopped at step (\d+), saved in last\.ckpt; resume with `(.+)`$", err, re.M)
    assert len(stopped) == 1, err[-3000:]
    step, command = int(stopped[0][0]), shlex.split(stopped[0][1])
    assert step == 10 and seen == 8 and checkpoint_step(last) == step

    assert command[:4] == ["python", "-m", "gptlit", "fit"]
    resumed = subprocess.run(
        [sys.executable, *command[1:]], cwd=tmp_path, env=environment(), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_training_state(last, straight / "checkpoints" / "last.ckpt")


def test_kills_while_writing_checkpoints_always_leave_a_loadable_last_ckpt(
    tmp_path: Path, crash_data: Path, straight: Path, preloaded: Preloaded
) -> None:
    """A checkpoint every step, killed ten times (half of them as soon as a checkpoint write has begun)."""
    config = crash_config(tmp_path, "often", crash_data, every=1)
    ballast = '{"class_path": "probes.Ballast", "init_args": {"megabytes": 8}}'  # ~20 ms to write and sync
    checkpoints = tmp_path / "lightning_logs" / "often" / "checkpoints"
    last, partial = checkpoints / "last.ckpt", checkpoints / ".last.ckpt.staged.partial"
    rng = random.Random(0)
    args = ["fit", "--config", str(config), f"--trainer.callbacks+={ballast}"]
    steps, mid_write = [], 0
    for kill in range(10):  # each process gets at most two steps further, so ten kills fit in the run
        run_and_kill(preloaded, args, tmp_path, last, partial, mid_write=kill % 2 == 1, delay=rng.uniform(0, 0.1))
        mid_write += partial.exists()
        steps.append(load_checkpoint(last)["global_step"])  # loads, weights-only, and is a gptlit checkpoint
        args = ["fit", "--ckpt_path", "last"]
    assert steps == sorted(steps) and steps[-1] < MAX_STEPS, steps
    assert mid_write >= 1, "no kill landed while a checkpoint was being written"
    assert preloaded.wait(preloaded.start(args, tmp_path, tmp_path / "log")) == 0
    assert_same_training_state(last, straight / "checkpoints" / "last.ckpt")


def test_kills_during_preparation_never_leave_a_used_half_file(tmp_path: Path, preloaded: Preloaded) -> None:
    """`gptlit prepare` killed at random points: over an empty directory, then over a complete set it replaces.

    After every kill the directory holds a complete set (the one before, or the new one: equal byte for byte to
    an uninterrupted preparation) or none at all; the next run finishes the job.
    """
    write_corpus(tmp_path / "stories.txt", n=12_000)  # about a second of preparation
    names = ["tokenizer.json", "train.bin", "val.bin", "train_offsets.npy", "val_offsets.npy"]
    outcomes: list[str] = []

    def prepare(data_dir: Path, val_fraction: float) -> list[str]:
        path = write_config(tmp_path, name=data_dir.name)
        config = yaml.safe_load(path.read_text())
        config["data"].update(data_dir=str(data_dir), val_fraction=val_fraction)
        path.write_text(yaml.safe_dump(config))
        return ["prepare", "--config", str(path)]

    def files(data_dir: Path) -> dict[str, bytes]:
        return {name: (data_dir / name).read_bytes() for name in names}

    def timed_run(args: list[str]) -> float:
        started = time.monotonic()
        assert preloaded.wait(preloaded.start(args, tmp_path, tmp_path / "log")) == 0
        return time.monotonic() - started

    def kill_at(args: list[str], seconds: float, data_dir: Path, complete: list[dict[str, bytes]]) -> None:
        pid = preloaded.start(args, tmp_path, tmp_path / "log")
        time.sleep(seconds)
        os.kill(pid, signal.SIGKILL)
        preloaded.wait(pid)
        module = TinyStoriesDataModule(source=str(tmp_path / "stories.txt"), data_dir=str(data_dir), block_size=32)
        if (data_dir / "meta.json").is_file():  # committed: one of the complete sets, exactly
            module.setup("fit")
            assert files(data_dir) in complete
            outcomes.append("previous" if files(data_dir) == complete[0] and len(complete) > 1 else "complete")
        else:  # none: nothing is read, and the next run prepares afresh
            with pytest.raises(DataError, match=r"meta\.json not found"):
                module.setup("fit")
            outcomes.append("temporaries" if list(data_dir.glob("*.tmp")) else "none")

    rng = random.Random(0)
    # An empty directory: tokenizer training and encoding.
    duration = timed_run(prepare(tmp_path / "clean", 0.01))
    clean, fresh = files(tmp_path / "clean"), tmp_path / "fresh"
    for kill in range(4):  # one kill in each quarter of the run's time, at a random point within it
        kill_at(prepare(fresh, 0.01), duration * (kill + rng.random()) / 4, fresh, [clean])
        if outcomes[-1] == "complete":
            shutil.rmtree(fresh)  # it finished before the kill: start over, so the next kill lands mid-run
    timed_run(prepare(fresh, 0.01))
    assert files(fresh) == clean and not list(fresh.glob("*.tmp"))

    # Over the complete set: another split of the same stories, the same tokenizer, re-encoded.
    shutil.copytree(tmp_path / "clean", tmp_path / "resplit")
    duration = timed_run(prepare(tmp_path / "resplit", 0.05))
    resplit, again = files(tmp_path / "resplit"), tmp_path / "again"
    assert resplit != clean
    for kill in range(3):
        shutil.rmtree(again, ignore_errors=True)
        shutil.copytree(tmp_path / "clean", again)
        kill_at(prepare(again, 0.05), duration * (kill + rng.random()) / 3, again, [clean, resplit])
    timed_run(prepare(again, 0.05))
    assert files(again) == resplit and not list(again.glob("*.tmp"))
    assert "temporaries" in outcomes, outcomes  # some kill landed while files were being written
