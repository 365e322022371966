"""Run directories: where a run lives, which run to resume, and the model and tokenizer of its checkpoints.

A run lives in ``<root>/lightning_logs/<run_name>/`` with ``config.yaml``, ``hparams.yaml``, the
TensorBoard event files and ``checkpoints/{last,best,stable}.ckpt``.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from gptlit.checkpoint import check_same_shape as check_same_shape  # gptlit 0.2.0's place of it (gptlit.runs)
from gptlit.checkpoint import existing_checkpoint, read_checkpoint, tokenizer_json
from gptlit.data.tokenizer import Tokenizer
from gptlit.errors import UsageError
from gptlit.model.gpt import GPT
from gptlit.training.optim import count_warmup_steps, wsd_decay_start

LOGS_DIR = "lightning_logs"
CHECKPOINT_ALIASES = ("last", "best", "stable")
ATTEMPTS_DIR = "attempts"  # <run>/attempts/<time>/: the logs of earlier starts that saved no checkpoint

# Read before gptlit 0.2 from this module; gptlit.checkpoint reads checkpoints now.
load_checkpoint = read_checkpoint


def run_dir(root: str | Path, run_name: str) -> Path:
    return Path(root) / LOGS_DIR / run_name


def shown(path: str | Path) -> str:
    """``path`` as a user would type it here: relative to the working directory when it lies under it."""
    absolute = Path(os.path.abspath(path))
    try:
        return str(absolute.relative_to(os.getcwd()))
    except ValueError:
        return str(absolute)


def latest_run(root: str | Path) -> Path | None:
    """The run under ``<root>/lightning_logs`` whose config or checkpoints were written last."""
    logs = Path(root) / LOGS_DIR
    candidates = []
    for path in logs.glob("*/config.yaml") if logs.is_dir() else []:
        stamps = [p.stat().st_mtime for p in (path, *path.parent.glob("checkpoints/*.ckpt"))]
        candidates.append((max(stamps), path.parent))
    return max(candidates)[1] if candidates else None


def run_names(root: str | Path) -> list[str]:
    """The names of the runs under ``<root>/lightning_logs``: directories with a ``config.yaml`` or checkpoints."""
    logs = Path(root) / LOGS_DIR
    runs = logs.iterdir() if logs.is_dir() else []
    return sorted(p.name for p in runs if (p / "config.yaml").is_file() or (p / "checkpoints").is_dir())


def named_run(root: str | Path, run_name: str) -> Path:
    """The directory of run ``run_name``; a name of no run is refused, naming the runs there are."""
    run = run_dir(root, run_name)
    if run.is_dir():
        return run
    names = run_names(root)
    there = f"the runs there: {', '.join(names)}" if names else "there are no runs there yet"
    raise UsageError(f"no run '{run_name}' in {shown(run.parent)}; {there}")


def has_checkpoint(run: Path) -> bool:
    """Whether the run has saved any checkpoint in its ``checkpoints/`` directory."""
    return any((run / "checkpoints").glob("*.ckpt"))


def set_aside(run: Path) -> Path:
    """Move what ``run`` holds into ``<run>/attempts/<time>/`` and return that directory.

    A run that saved no checkpoint has nothing to resume: starting it over keeps its earlier logs there
    (TensorBoard still shows them, as a run of their own). Hidden files stay where they are.
    """
    aside = run / ATTEMPTS_DIR / time.strftime("%Y%m%d-%H%M%S")
    aside.mkdir(parents=True, exist_ok=True)
    for entry in run.iterdir():
        if entry.name != ATTEMPTS_DIR and not entry.name.startswith("."):
            shutil.move(entry, aside / entry.name)
    return aside


def resolve_checkpoint(ckpt_path: str, run: Path | None) -> Path:
    """Turn ``last``/``best``/``stable`` (of ``run``) or a file path into an existing checkpoint file."""
    if ckpt_path in CHECKPOINT_ALIASES:
        if run is None:
            raise UsageError(
                f"--ckpt_path {ckpt_path}: no run found to resume; start one with "
                "`python -m gptlit fit --config configs/tiny.yaml`"
            )
        named_run(run.parent.parent, run.name)  # a run that does not exist is refused, naming those that do
        if ckpt_path == "stable":
            hint = (
                "a run saves it when the decay of its wsd schedule starts (model.schedule wsd), "
                "so resume this one with --ckpt_path last"
            )
        else:
            hint = f"the run has saved no {ckpt_path} checkpoint yet, so start it afresh without --ckpt_path"
        return existing_checkpoint(run / "checkpoints" / f"{ckpt_path}.ckpt", hint)
    return existing_checkpoint(ckpt_path)


def check_same_optimizer(checkpoint: dict[str, Any], optimizer: str, path: str | Path) -> None:
    """Refuse to resume a checkpoint's optimizer state into another kind of optimizer (its state would not fit)."""
    saved = checkpoint.get("hyper_parameters", {}).get("optimizer", "adamw")  # 0.1.0 knew only AdamW
    if saved != optimizer:
        raise UsageError(
            f"{path} was trained with model.optimizer {saved}, and its state cannot continue as {optimizer}; "
            f"resume with --model.optimizer {saved}, or start a new run from its weights"
        )


def check_decay_not_begun(
    checkpoint: dict[str, Any], schedule: str, max_steps: int, path: Path, ckpt_path: str
) -> None:
    """Refuse to give a wsd run whose decay has begun another length: the rate would jump mid-decay.

    A resume with the run's own max_steps goes on; one from ``stable.ckpt`` (saved as the decay starts) may take
    any length, and decays once, at its new end. A checkpoint that does not record its run's length (written
    before gptlit recorded it) is not checked.
    """
    hparams, step = checkpoint.get("hyper_parameters") or {}, checkpoint.get("global_step", 0)
    total = (checkpoint.get("gptlit") or {}).get("total_steps")
    if (
        total is None
        or max_steps in (total, -1)
        or max_steps <= step
        or not hparams.get("schedule") == schedule == "wsd"
    ):
        return
    start = wsd_decay_start(count_warmup_steps(hparams["warmup"], total), total, hparams["decay_fraction"])
    if step <= start:
        return
    stable = path.parent / "stable.ckpt"
    if stable.is_file():
        where = "stable" if ckpt_path in CHECKPOINT_ALIASES else str(stable)
        hint = f"extend it from the state before its decay with --ckpt_path {where} --trainer.max_steps {max_steps}"
    else:
        hint = f"there is no {stable} to extend it from the state before its decay"
    raise UsageError(
        f"{path} is at step {step}, past the start of its learning-rate decay (step {start} of {total}): with "
        f"trainer.max_steps {max_steps} the decay would be laid anew mid-way and the rate would jump; {hint}, "
        f"or resume with --trainer.max_steps {total}"
    )


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """The GPT (eval mode, on ``device``) and Tokenizer that a gptlit checkpoint carries, loaded weights-only."""
    checkpoint = read_checkpoint(path)
    tokenizer = Tokenizer.from_str(tokenizer_json(checkpoint, path))
    return GPT.from_checkpoint(checkpoint).to(device).eval(), tokenizer


def run_data_dir(checkpoint: str | Path) -> Path | None:
    """The prepared data directory that the run of ``checkpoint`` (a file in a run's ``checkpoints/``) trained on,
    as its ``config.yaml`` names it (``data.data_dir``), when that directory is there; else None.

    A relative directory is looked for where the run's ``lightning_logs/`` is, then in the working directory.
    """
    checkpoint = Path(checkpoint)
    run = checkpoint.parent.parent
    if checkpoint.parent.name != "checkpoints":
        return None
    try:
        data_dir = Path(yaml.safe_load((run / "config.yaml").read_text())["data"]["data_dir"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    places = [data_dir] if data_dir.is_absolute() else [run.parent.parent / data_dir, Path.cwd() / data_dir]
    return next((place for place in places if (place / "meta.json").is_file()), None)


def find_checkpoint(ckpt_path: str, root: str | Path = ".", run_name: str | None = None) -> Path:
    """A checkpoint file from a path, or from ``last``/``best`` of a named run (default: the latest run)."""
    run = run_dir(root, run_name) if run_name else latest_run(root)
    return resolve_checkpoint(ckpt_path, run)
