"""python -m gptlit tune (gptlit.tune): search files, studies in SQLite, kill-safety, pruning, several processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from helpers import run_cli, write_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptlit.checkpoint import read_checkpoint
from gptlit.training.scoring import checkpoint_bpb
from gptlit.tune.command import check_fit_options
from gptlit.tune.space import Param, fit_args, read_search

ROOT = Path(__file__).parents[1]
SEARCH = {
    "model.learning_rate": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True},
    "model.config.n_layers": {"type": "int", "low": 1, "high": 2},
}
State = optuna.trial.TrialState


def write_search(path: Path, search: dict | str = SEARCH) -> Path:
    path.write_text(search if isinstance(search, str) else yaml.safe_dump(search))
    return path


def tune_args(workdir: Path, trials: int, *more: str, seconds: float = 3) -> list[str]:
    """A study of the tiny model of helpers.write_config, ``seconds`` of training per trial."""
    config = write_config(workdir, name="tiny", max_steps=-1, max_time={"seconds": seconds})
    search = workdir / "search.yaml"
    if not search.exists():
        write_search(search)
    return ["tune", "--config", str(config), "--search", str(search), "--trials", str(trials), *more]


def tune(workdir: Path, args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``python -m gptlit <args>`` in a process of its own, in ``workdir``, on one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "gptlit", *args]
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, **kwargs)


def start(workdir: Path, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "gptlit", *args]
    return subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def study_of(workdir: Path, name: str = "tiny-search") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{workdir / 'lightning_logs' / name / 'study.db'}")


def states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in sorted(study.get_trials(), key=lambda t: t.number)]


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


# Search files -------------------------------------------------------------------------------------------------


def test_a_search_file_reads_as_optunas_suggest_calls(tmp_path: Path) -> None:
    search = tmp_path / "search.yaml"
    search.write_text(
        "model.learning_rate: {type: float, low: 1e-3, high: 1.0e-2, log: true}\n"  # 1e-3: text to YAML
        "model.config.n_layers: {type: int, low: 2, high: 6, step: 2}\n"
        "model.config.mlp: {type: categorical, choices: [gelu, swiglu]}\n"
        "model.config.qk_norm: {type: categorical, choices: [true, false]}\n"
    )
    params = read_search(search)
    assert params[0] == Param("model.learning_rate", "float", low=1e-3, high=1e-2, log=True)
    drawn = {p.key: p.suggest(optuna.trial.FixedTrial({p.key: p.first() for p in params})) for p in params}
    assert drawn == {
        "model.learning_rate": 1e-3,
        "model.config.n_layers": 2,
        "model.config.mlp": "gelu",
        "model.config.qk_norm": True,
    }
    assert fit_args(drawn) == [
        "--model.learning_rate=0.001",
        "--model.config.n_layers=2",
        "--model.config.mlp=gelu",
        "--model.config.qk_norm=true",
    ]


@pytest.mark.parametrize("search", sorted((ROOT / "configs" / "search").glob("*.yaml")), ids=lambda p: p.name)
def test_the_shipped_searches_are_ones_that_fit_takes_with_tiny_yaml(search: Path) -> None:
    params = read_search(search)
    for end in (0, -1):  # the low ends, then the high ends
        values = {p.key: p.choices[end] if p.type == "categorical" else (p.low, p.high)[end] for p in params}
        check_fit_options(["--config", str(ROOT / "configs" / "tiny.yaml"), *fit_args(values)], str(search))


BAD_SEARCHES = {
    "unknown-key": ("model.bogus: {type: float, low: 1, high: 2}", "unrecognized arguments: --model.bogus"),
    "low-above-high": ("model.learning_rate: {type: float, low: 0.1, high: 0.01}", "low 0.1 is above high 0.01"),
    "log-of-zero": ("model.learning_rate: {type: float, low: 0, high: 0.1, log: true}", "a log scale needs low > 0"),
    "no-choices": ("model.config.mlp: {type: categorical, choices: []}", "choices must be a non-empty list"),
    "unknown-type": ("model.config.mlp: {type: choice, choices: [gelu]}", "type 'choice' is not one of"),
    "unknown-field": ("model.config.n_layers: {type: int, lo: 1, high: 2}", "int takes low, high, log, step, not lo"),
    "reserved": ("run_name: {type: categorical, choices: [a]}", "tune sets this option"),
    "wrong-value": ("model.config.n_layers: {type: categorical, choices: [two]}", "model.config.n_layers"),
}


@pytest.mark.parametrize("case", BAD_SEARCHES)
def test_a_bad_search_file_is_refused_in_one_line_before_anything_trains(
    workdir: Path, case: str, capsys: pytest.CaptureFixture
) -> None:
    text, message = BAD_SEARCHES[case]
    write_search(workdir / "search.yaml", text)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*tune_args(workdir, 3))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code != 0
    assert len(err.splitlines()) == 1 and err.startswith("gptlit: error:") and message in err, err
    assert not (workdir / "lightning_logs").exists() and not any((workdir / "data").iterdir())


@pytest.mark.parametrize("option", ["--trials=0", "--startup_trials=-1", "--prune_after=-1", "--score_tokens=-1"])
def test_a_bad_tune_option_is_refused_in_one_line(workdir: Path, option: str, capsys: pytest.CaptureFixture) -> None:
    write_search(workdir / "search.yaml", "model.learning_rate: {type: float, low: 1.0e-3, high: 1.0e-2}")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*tune_args(workdir, 3), option)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code != 0
    assert len(err.splitlines()) == 1 and option.split("=")[0] in err, err
    assert not (workdir / "lightning_logs").exists()


def test_tune_without_optuna_says_how_to_install_it(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    with pytest.raises(SystemExit):
        run_cli(*tune_args(workdir, 3))
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install -e ".[tune]"' in err, err


def test_fit_and_the_trials_callback_never_import_optuna() -> None:
    code = "import sys, gptlit.cli.main, gptlit.tune.report; assert 'optuna' not in sys.modules, 'optuna imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# Studies ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_study_writes_its_record_its_table_and_a_best_yaml_that_fit_takes(workdir: Path) -> None:
    done = tune(workdir, tune_args(workdir, 3, "--score_tokens", "100"))
    assert done.returncode == 0, done.stderr
    study_dir = workdir / "lightning_logs" / "tiny-search"
    study = study_of(workdir)
    assert states(study) == ["COMPLETE"] * 3
    table = done.stdout.splitlines()
    assert table[1].split()[:6] == ["trial", "state", "val", "bpb", "steps", "minutes"]
    rows = [line.split() for line in table[2:5]]
    assert [row[2] for row in rows] == [f"{v:.4f}" for v in sorted(t.value for t in study.trials)]  # best first
    assert {row[1] for row in rows} == {"complete"}
    best = study.best_trial
    assert rows[0][0] == str(best.number)
    # Each trial is a run of its own, with its values, its steps, and its score for TensorBoard's HPARAMS tab.
    run = study_dir / "lightning_logs" / f"trial-{best.number:03d}"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["learning_rate"] == best.params["model.learning_rate"]
    assert saved["model"]["config"]["n_layers"] == best.params["model.config.n_layers"]
    events = EventAccumulator(str(run))
    events.Reload()
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
    assert events.Scalars("tune/bpb")[-1].value == pytest.approx(best.value)
    assert best.user_attrs["steps"] == events.Scalars("tune/bpb")[-1].step > 0
    # Its score: its last checkpoint's bits per byte on the validation split's first 100 tokens.
    last = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert best.value == pytest.approx(checkpoint_bpb(last, saved["data"]["data_dir"], max_tokens=100), rel=1e-6)
    # best.yaml: the best trial's config, as a new run of its own.
    config = yaml.safe_load((study_dir / "best.yaml").read_text())
    assert config["model"]["learning_rate"] == best.params["model.learning_rate"]
    assert "run_name" not in config and config["trainer"]["callbacks"] == []
    run_cli("fit", "--config", str(study_dir / "best.yaml"), "--trainer.max_time", "00:00:00:02")
    assert (workdir / "lightning_logs" / "best" / "checkpoints" / "last.ckpt").is_file()
    # --show prints the same table, any time.
    shown = tune(workdir, ["tune", "--config", "tiny.yaml", "--search", "search.yaml", "--show"])
    assert shown.returncode == 0 and shown.stdout.splitlines()[1:5] == table[1:5]


@pytest.mark.slow
def test_kill_9_loses_only_the_running_trial_and_the_same_command_finishes_the_study(workdir: Path) -> None:
    args = tune_args(workdir, 3)
    first = start(workdir, args)
    trial_1 = workdir / "lightning_logs" / "tiny-search" / "lightning_logs" / "trial-001"
    wait_for(lambda: (trial_1 / "checkpoints" / "last.ckpt").is_file() or first.poll() is not None)
    lock = json.loads((trial_1 / ".lock").read_text())
    first.send_signal(signal.SIGKILL)
    first.wait()
    kept = study_of(workdir).trials[0]
    assert states(study_of(workdir)) == ["COMPLETE", "RUNNING"]
    wait_for(lambda: not _alive(lock["pid"]), timeout=60)  # the orphaned trial stops itself

    done = tune(workdir, args)
    assert done.returncode == 0, done.stderr
    assert "trial 1 lost its tune process" in done.stderr
    study = study_of(workdir)
    assert states(study) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[0].value == kept.value and study.trials[0].params == kept.params
    assert "lost" in study.trials[1].user_attrs
    assert " lost " in done.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_two_processes_share_one_study_without_losing_or_repeating_a_trial(workdir: Path) -> None:
    args = tune_args(workdir, 4, seconds=2)
    processes = [start(workdir, args) for _ in range(2)]
    for process in processes:
        assert process.wait(timeout=300) == 0, process.stderr.read()
    study = study_of(workdir)
    counted = [t for t in study.trials if t.state == State.COMPLETE]
    assert len(counted) == 4
    assert all(t.state == State.COMPLETE or "surplus" in t.user_attrs for t in study.trials)
    workers = {t.user_attrs["worker"]["pid"] for t in counted}
    assert workers == {p.pid for p in processes}  # both trained
    runs = sorted((workdir / "lightning_logs" / "tiny-search" / "lightning_logs").iterdir())
    assert [r.name for r in runs] == [f"trial-{t.number:03d}" for t in counted]


@pytest.mark.slow
def test_a_trial_worse_than_the_median_is_pruned_and_a_failing_one_recorded(workdir: Path) -> None:
    config = write_config(workdir, name="tiny", max_steps=160)
    write_search(workdir / "search.yaml", {"model.learning_rate": SEARCH["model.learning_rate"] | {"low": 1e-7}})
    url = f"sqlite:///{workdir / 'study.db'}"
    study = optuna.create_study(study_name="pruning", storage=url)
    study.enqueue_trial({"model.learning_rate": 3e-3})
    study.enqueue_trial({"model.learning_rate": 1e-7})  # learns nothing: behind the first from its first validation
    args = ["tune", "--config", str(config), "--search", "search.yaml", "--study_name", "pruning", "--storage", url]
    done = tune(workdir, [*args, "--trials", "2", "--prune_after", "1", "--model.min_lr", "1e-8"])
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(study_name="pruning", storage=url)
    assert states(study) == ["COMPLETE", "PRUNED"]
    assert study.trials[1].user_attrs["steps"] == 8  # pruned at its first validation
    pruned = workdir / "lightning_logs" / "pruning" / "lightning_logs" / "trial-001" / "checkpoints" / "last.ckpt"
    assert torch.load(pruned, weights_only=True)["global_step"] < 160  # and stopped there, its last.ckpt saved
    assert "trial 1 pruned at step 8" in done.stderr and " pruned " in done.stdout

    write_search(workdir / "heads.yaml", {"model.config.n_heads": {"type": "categorical", "choices": [3]}})
    args[4] = "heads.yaml"
    done = tune(workdir, [*args, "--trials", "4"])  # 32 wide in 3 heads: cannot be built
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(study_name="pruning", storage=url)
    assert states(study) == ["COMPLETE", "PRUNED", "FAIL", "FAIL"]  # the study went on after the first failure
    reason = study.trials[2].user_attrs["error"]
    assert "n_heads" in reason and "\n" not in reason
    assert f"trial 2: {reason}" in done.stdout
