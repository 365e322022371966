"""Directory locks with real processes: one `fit` per run, one preparation per data directory at a time.

A second `fit` of a run another process trains is refused in one line naming that process, and changes nothing;
`sample` and `export` read the run meanwhile; `kill -9` leaves no lock behind; two preparations of one data
directory take turns, the second finding the first's result.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import write_config, write_corpus
from preloaded import Preloaded

from gptlit.data.options import DataOptions
from gptlit.data.prepare import prepare_dataset
from gptlit.data.store import read_meta
from gptlit.locks import holder, lock_directory

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def preloaded() -> Preloaded:
    server = Preloaded({**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])})
    yield server
    server.close()


@pytest.fixture
def running(preloaded: Preloaded) -> list[int]:
    """Commands a test started and has not waited for (it removes those it waits for): killed when it ends,
    so that a failed test leaves no run paused."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if preloaded.poll(pid) is None:
            os.kill(pid, signal.SIGKILL)
            preloaded.wait(pid)


def finish(preloaded: Preloaded, pid: int, log: Path) -> tuple[int, str]:
    """The exit code and output of a started command; it is killed (and the test fails) if it runs too long."""
    deadline = time.monotonic() + TIMEOUT_S
    while (code := preloaded.poll(pid)) is None:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            preloaded.wait(pid)
            pytest.fail(f"still running after {TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    return code, log.read_text()


def run(preloaded: Preloaded, args: list[str], cwd: Path, log: Path) -> tuple[int, str]:
    return finish(preloaded, preloaded.start(args, cwd, log), log)


def wait_for(condition, preloaded: Preloaded, running: list[int], log: Path) -> None:
    """Wait for ``condition`` while the processes ``running`` run; fail with ``log`` if one of them ends first
    (it is then removed from ``running``)."""
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        ended = [pid for pid in running if preloaded.poll(pid) is not None]
        for pid in ended:
            running.remove(pid)
        assert not ended and time.monotonic() < deadline, log.read_text()[-3000:] if log.exists() else "no log"
        time.sleep(0.02)


def start_paused_fit(preloaded: Preloaded, root: Path, gate: Path, running: list[int]) -> tuple[int, Path]:
    """`fit` of a tiny model for 12 steps (``root/run.yaml``), held at step 6 until ``gate`` exists."""
    write_corpus(root / "stories.txt")
    config = write_config(root, name="run", max_steps=12)
    pause = json.dumps({"class_path": "probes.PauseAt", "init_args": {"step": 6, "gate": str(gate)}})
    log = root / "first.log"
    pid = preloaded.start(["fit", "--config", str(config), f"--trainer.callbacks+={pause}"], root, log)
    running.append(pid)
    wait_for(Path(f"{gate}.reached").exists, preloaded, running, log)
    return pid, config


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_second_fit_of_a_run_in_training_is_refused_and_readers_go_on(
    tmp_path: Path, preloaded: Preloaded, running: list[int]
) -> None:
    gate = tmp_path / "go"
    first, config = start_paused_fit(preloaded, tmp_path, gate, running)
    run_dir = tmp_path / "lightning_logs" / "run"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "config.yaml").is_file()
    before = files_of(run_dir)
    for args in (
        ["fit", "--ckpt_path", "last"],
        ["fit", "--config", str(config)],  # a fresh start of the same run
        ["fit", "--config", str(config), "--overwrite", "true"],
    ):
        code, output = run(preloaded, args, tmp_path, tmp_path / "second.log")
        last_line = output.strip().splitlines()[-1]
        assert code == 1 and "Traceback" not in output, output[-3000:]
        assert last_line.startswith("gptlit: error: ") and f"is in use by pid {first} on " in last_line, last_line
        assert "gptlit fit --config" in last_line  # the holder's command
    assert files_of(run_dir) == before  # nothing of the running run touched
    # Readers of the run need no lock.
    code, output = run(preloaded, ["sample", "--ckpt_path", "last", "--max_new_tokens", "4"], tmp_path, tmp_path / "s")
    assert code == 0, output[-3000:]
    code, output = run(preloaded, ["export", "--ckpt_path", "last", "--out_dir", "hf"], tmp_path, tmp_path / "e")
    assert code == 0 and (tmp_path / "hf" / "config.json").is_file(), output[-3000:]

    gate.touch()
    running.remove(first)
    code, output = finish(preloaded, first, tmp_path / "first.log")
    assert code == 0, output[-3000:]
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 12
    assert not (run_dir / ".lock").exists()  # let go at the end


def test_a_lock_dies_with_its_process(tmp_path: Path, preloaded: Preloaded, running: list[int]) -> None:
    gate = tmp_path / "go"
    first, _ = start_paused_fit(preloaded, tmp_path, gate, running)
    run_dir = tmp_path / "lightning_logs" / "run"
    assert holder(run_dir).startswith(f"pid {first} on ")
    os.kill(first, signal.SIGKILL)
    running.remove(first)
    assert preloaded.wait(first) == -signal.SIGKILL
    assert (run_dir / ".lock").is_file()  # the file stays behind; its lock does not
    gate.touch()  # the resumed run keeps the pause among its callbacks: let it through
    code, output = run(preloaded, ["fit", "--ckpt_path", "last"], tmp_path, tmp_path / "resumed.log")
    assert code == 0, output[-3000:]
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 12


def test_a_forked_child_does_not_keep_its_parents_lock(tmp_path: Path) -> None:
    """A DataLoader worker that outlives its killed fit for a moment must not keep the run locked."""
    program = (
        "import os, sys, time\n"
        "from gptlit.locks import lock_directory\n"
        "lock_directory(sys.argv[1])\n"
        "child = os.fork()\n"
        "if child == 0:  # at-fork handlers have run: the child is where a DataLoader worker starts\n"
        "    open(sys.argv[2] + '.child', 'w').close()\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "while not os.path.exists(sys.argv[2] + '.child'):\n"
        "    time.sleep(0.01)\n"
        "open(sys.argv[2], 'w').write(str(child))\n"
        "os._exit(0)  # without letting go, as under kill -9\n"
    )
    subprocess.run([sys.executable, "-c", program, str(tmp_path / "run"), str(tmp_path / "pid")], check=True)
    child = int((tmp_path / "pid").read_text())
    try:
        with lock_directory(tmp_path / "run"):
            assert holder(tmp_path / "run").startswith(f"pid {os.getpid()} on ")
    finally:
        os.kill(child, signal.SIGKILL)


def test_two_preparations_of_one_directory_take_turns(
    tmp_path: Path, preloaded: Preloaded, running: list[int], capsys: pytest.CaptureFixture
) -> None:
    """Both wait while this test holds the directory, then one prepares and the other finds it prepared."""
    write_corpus(tmp_path / "stories.txt")
    config, data_dir = write_config(tmp_path, name="run"), tmp_path / "data"
    logs = [tmp_path / f"prepare{i}.log" for i in range(2)]
    with lock_directory(data_dir):
        pids = [preloaded.start(["prepare", "--config", str(config)], tmp_path, log) for log in logs]
        running += pids
        waiting = f"waiting for pid {os.getpid()} on "
        for log in logs:
            wait_for(lambda log=log: log.exists() and waiting in log.read_text(), preloaded, running, log)
    outputs = []
    for pid, log in zip(pids, logs, strict=True):
        running.remove(pid)
        code, output = finish(preloaded, pid, log)
        assert code == 0, output[-3000:]
        assert output.count("waiting for") == 1, output  # said once
        outputs.append(output)
    assert sorted("gptlit data: preparing" in output for output in outputs) == [False, True]
    assert sorted("up to date" in output for output in outputs) == [False, True]
    meta = read_meta(data_dir)
    assert meta["settings"]["tokenizer_trained_with"] == {"vocab_size": 320, "tokenizer_train_stories": 100_000}
    assert not list(data_dir.glob("*.tmp")) and not (data_dir / ".lock").exists()

    # Another vocabulary size afterwards: a new tokenizer, never "up to date".
    capsys.readouterr()
    prepare_dataset(DataOptions(source=str(tmp_path / "stories.txt"), vocab_size=300), data_dir)
    assert "retraining" in capsys.readouterr().err
    meta = read_meta(data_dir)
    assert meta["vocab_size"] <= 300 and meta["settings"]["tokenizer_trained_with"]["vocab_size"] == 300
