"""Running one trial: ``python -m gptlit fit`` in a process of its own, watched by the tune process.

A process per trial isolates what a trial may do (a NaN, a config that cannot be built, a crash, a leak of
memory) from the search, and is the same ``fit`` a user runs. Its output goes to ``<study>/logs/trial-NNN.log``;
its validations come back through ``TrialReport``'s file, and the watcher may stop it (SIGTERM: after the current
batch, with ``last.ckpt`` saved) when Optuna prunes it.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gptlit.tune.report import TrialReport

POLL_S = 0.5  # how often the watcher reads the trial's reports
STOP_WAIT_S = 60.0  # how long a stopped trial may take to save last.ckpt before it is killed


@dataclass
class TrialFiles:
    """Where trial ``name`` of a study lives: its run (``<study>/lightning_logs/<name>``), its log and its reports."""

    study_dir: Path
    name: str

    @property
    def run(self) -> Path:
        return self.study_dir / "lightning_logs" / self.name

    @property
    def log(self) -> Path:
        return self.study_dir / "logs" / f"{self.name}.log"

    @property
    def report(self) -> Path:
        return self.study_dir / "logs" / f"{self.name}.jsonl"


@dataclass
class TrialOutcome:
    """How a trial's ``fit`` ended: its exit code, the validation at which the watcher stopped it (if it did; the
    trial may have ended by itself meanwhile), and its validations."""

    returncode: int
    stopped_at: tuple[int, float] | None = None  # (step, value)
    reports: list[tuple[int, float]] = field(default_factory=list)  # (step, value)

    def error(self, log: Path) -> str:
        """Why a failed ``fit`` failed, in one line: its ``gptlit: error:`` line, else its last line."""
        lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines()]
        errors = [_reason(line) for line in lines if line.startswith("gptlit: error: ")]
        last = next((line for line in reversed(lines) if line), "")
        if self.returncode < 0:
            return f"killed by signal {-self.returncode} ({signal.Signals(-self.returncode).name})"
        return errors[-1] if errors else last or f"fit exited with code {self.returncode}"


def _reason(error_line: str) -> str:
    """A ``gptlit: error:`` line without its prefix and its pointer to ``fit --help``."""
    return re.sub(r"; see `[^`]*--help` for the options$", "", error_line.removeprefix("gptlit: error: "))


def fit_command(args: list[str], files: TrialFiles) -> list[str]:
    """The ``fit`` of a trial: the options ``args`` (config, shared options, the trial's values), in the study's
    directory, under the trial's name, reporting its validations."""
    report = {"class_path": f"{TrialReport.__module__}.TrialReport", "init_args": {"path": str(files.report)}}
    return [
        sys.executable,
        "-m",
        "gptlit",
        "fit",
        *args,
        "--trainer.default_root_dir",
        str(files.study_dir),
        "--run_name",
        files.name,
        "--overwrite",  # a trial's number is new to the study: a run of its name is left from a deleted study
        "true",
        f"--trainer.callbacks+={json.dumps(report)}",
    ]


def run_fit(command: list[str], files: TrialFiles, should_stop: Callable[[int, float], bool]) -> TrialOutcome:
    """Run a trial's ``fit``, passing each validation to ``should_stop(step, value)``; when it says so, stop the
    trial. Ctrl-C (or SIGTERM turned into KeyboardInterrupt) stops it too, then goes on up."""
    files.log.parent.mkdir(parents=True, exist_ok=True)
    files.report.unlink(missing_ok=True)
    outcome = TrialOutcome(returncode=0)
    with open(files.log, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            while process.poll() is None:
                time.sleep(POLL_S)
                _pass_on(_new_reports(files.report, outcome.reports), outcome, should_stop, process)
        finally:
            _end(process)
    _pass_on(_new_reports(files.report, outcome.reports), outcome, should_stop, None)  # written as it ended
    outcome.returncode = process.returncode
    return outcome


def _pass_on(
    reports: list[tuple[int, float]],
    outcome: TrialOutcome,
    should_stop: Callable[[int, float], bool],
    process: subprocess.Popen | None,
) -> None:
    """Give ``should_stop`` each new validation, up to the first it stops the trial at; stop the process then."""
    for step, value in reports:
        if outcome.stopped_at is None and should_stop(step, value):
            outcome.stopped_at = (step, value)
            if process is not None:
                process.send_signal(signal.SIGTERM)


def _new_reports(path: Path, seen: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The complete lines of the report file not yet in ``seen``; adds them there."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    new = [json.loads(line) for line in lines[len(seen) :] if line.endswith("\n")]
    seen.extend((entry["step"], entry["value"]) for entry in new)
    return seen[len(seen) - len(new) :]


def _end(process: subprocess.Popen) -> None:
    """Let a trial's process end: it has, or it was asked to stop and saves ``last.ckpt``, or it is killed."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
