"""A study's record and results: its Optuna storage, which trials count, the table, ``best.yaml``, TensorBoard's
HPARAMS.

The storage is the record: a trial is in it from the moment it starts, with its values, its state, its score and
why it failed. Any process (on any machine, given a shared database) continues the study from it. Optuna is
imported by the callers and passed in, so that this module can be read without it.
"""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from gptlit.tune.report import TrialReport

STUDY_FILE = "study.db"
BEST_FILE = "best.yaml"
HEARTBEAT_S = 30  # a trial's tune process records that it lives this often (RDB storages)
GRACE_S = 120  # a RUNNING trial whose process has not done so for this long is lost (on another machine)
# Attributes of a trial (Optuna user attrs) that the tune command sets.
WORKER, ERROR, LOST, SURPLUS, STEPS = "worker", "error", "lost", "surplus", "steps"


def open_storage(optuna: Any, url: str) -> Any:
    """The study's storage with heartbeats, so that a trial whose process died is found out; SQLite waits for
    another process's write instead of failing at once."""
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    attempt = 0
    while True:
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S
            )
        except Exception:  # several processes creating one SQLite file's tables at once: one wins, retry
            attempt += 1
            if attempt == 5:
                raise
            time.sleep(attempt)


def counts(trial: Any, TrialState: Any) -> bool:
    """Whether a finished trial counts toward ``--trials``: it completed, was pruned, or failed on its own (not
    one stopped with its tune process, nor one started when the study was already full)."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    attrs = trial.user_attrs
    return trial.state == TrialState.FAIL and ERROR in attrs and SURPLUS not in attrs


def worker() -> dict[str, Any]:
    """Who runs a trial: this machine's name and this process's id."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def mark_lost_trials(study: Any, storage: Any, TrialState: Any) -> list[int]:
    """Mark failed (as lost) the RUNNING trials of this machine whose tune process is gone (``kill -9``, a crash):
    at once, rather than after the heartbeat's grace period, which covers other machines. Returns their numbers."""
    lost, host = [], socket.gethostname()
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(WORKER) or {}
        if owner.get("host") != host or _alive(owner.get("pid")):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:
            storage.set_trial_user_attr(trial_id, LOST, f"its tune process (pid {owner.get('pid')}) ended")
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
            lost.append(trial.number)
        except Exception:  # another process marked it first
            continue
    return lost


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return True  # not ours to judge: the heartbeat will tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def table(trials: list[Any], TrialState: Any) -> str:
    """The trials, best first: completed by score, then pruned, failed and running; one column per searched
    option. Trials started when the study was full are left out."""
    shown = [t for t in trials if SURPLUS not in t.user_attrs]
    keys = sorted({key for t in shown for key in t.params})
    order = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1, TrialState.RUNNING: 2, TrialState.FAIL: 3}
    shown.sort(key=lambda t: (order.get(t.state, 4), t.value if t.value is not None else math.inf, t.number))
    header = ["trial", "state", "val bpb", "steps", "minutes", *keys]
    rows = [header]
    notes = []
    for t in shown:
        minutes = f"{t.duration.total_seconds() / 60:.2f}" if t.duration is not None else ""
        bpb = "" if t.value is None else f"{t.value:.4f}"
        values = [shown_value(t.params[key]) if key in t.params else "" for key in keys]
        rows.append([str(t.number), _state(t, TrialState), bpb, str(t.user_attrs.get(STEPS, "")), minutes, *values])
        why = t.user_attrs.get(ERROR) or t.user_attrs.get(LOST)
        if why:
            notes.append(f"trial {t.number}: {why}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    if any(t.state == TrialState.PRUNED for t in shown):
        notes.insert(0, "a pruned trial's val bpb is its last validation's (trainer.limit_val_batches)")
    return "\n".join([*lines, *notes])


def _state(trial: Any, TrialState: Any) -> str:
    if trial.state == TrialState.FAIL:
        return "lost" if LOST in trial.user_attrs else "failed" if ERROR in trial.user_attrs else "stopped"
    return {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned"}.get(trial.state, trial.state.name.lower())


def shown_value(value: Any) -> str:
    """A drawn value as the table shows it: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_best(study_dir: Path, trial: Any, root_dir: str | None) -> Path:
    """``<study>/best.yaml``: the full config of ``trial``'s run, as ``fit --config best.yaml`` takes it (a new run
    named ``best``, in the run root the study was given), written whole or not at all."""
    run = study_dir / "lightning_logs" / f"trial-{trial.number:03d}"
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    for key in ("run_name", "overwrite", "ckpt_path", "config"):
        config.pop(key, None)
    trainer = config.setdefault("trainer", {})
    trainer["default_root_dir"] = root_dir
    callbacks = trainer.get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    trainer["callbacks"] = [c for c in callbacks if not str(c.get("class_path", "")).endswith(TrialReport.__name__)]
    values = ", ".join(f"{key} {shown_value(value)}" for key, value in trial.params.items())
    header = (
        f"# The best trial of the study in {study_dir}: trial {trial.number}, val bpb {trial.value:.4f} "
        f"({values}).\n# Train it: python -m gptlit fit --config {study_dir / BEST_FILE}\n"
    )
    path, partial = study_dir / BEST_FILE, study_dir / f".{BEST_FILE}.partial"
    partial.write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    os.replace(partial, path)
    return path


def log_hparams(run: Path, values: dict[str, Any], bpb: float, step: int) -> None:
    """The trial's values and score (``tune/bpb``) in its run's TensorBoard files, for the HPARAMS tab.

    gptlit's runs log no hparams summary of their own (``default_hp_metric=False``): the tab shows trials only.
    """
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    plain = {key: value if isinstance(value, (bool, int, float, str)) else str(value) for key, value in values.items()}
    experiment, start, end = hparams(plain, {"tune/bpb": bpb})
    with SummaryWriter(log_dir=str(run)) as writer:
        events = writer._get_file_writer()
        for summary in (experiment, start, end):
            events.add_summary(summary)
        writer.add_scalar("tune/bpb", bpb, step)
