"""Test-only callbacks that a `python -m gptlit fit` subprocess loads by class path (PYTHONPATH=tests).

Given on the command line, e.g. ``--trainer.callbacks+={"class_path": "probes.PoisonAt", "init_args": {"step": 9}}``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time
from pathlib import Path

import lightning as L
import torch


class PoisonAt(L.Callback):
    """Sets one weight to NaN before optimizer step ``step`` (0-based), so that step's loss is NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.wte.weight[0, 0] = math.nan


class PoisonGradientsAt(L.Callback):
    """Sets every gradient to NaN before optimizer step ``step`` (0-based): that step's loss was finite, the weights
    it leaves are all NaN, as after the last step of a run that diverges."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            for p in pl_module.parameters():
                p.grad.fill_(math.nan)


class RecordBatches(L.Callback):
    """Writes ``<out_dir>/rank<r>-from<first step>.json``: per optimizer step, a hash of each window in the batch."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.steps: dict[int, list[str]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        x, _ = batch
        self.steps[trainer.global_step] = [hashlib.sha1(row.numpy().tobytes()).hexdigest()[:16] for row in x.cpu()]

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{trainer.global_rank}-from{min(self.steps)}.json"
        path.write_text(json.dumps({str(step): rows for step, rows in self.steps.items()}))


class Ballast(L.Callback):
    """Adds ``megabytes`` of zeros to every checkpoint, so that writing one takes a real share of each step.

    The checkpoint of a tiny test model is written in a millisecond; a real model's takes seconds. Training
    is unchanged: Lightning ignores the extra entry when it resumes.
    """

    def __init__(self, megabytes: int) -> None:
        self.megabytes = megabytes

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["ballast"] = torch.zeros(self.megabytes << 18)  # float32: 4 bytes each


class InterruptAt(L.Callback):
    """Sends this process SIGINT (a user's Ctrl-C) at the end of optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


class WaitForSignalAt(L.Callback):
    """At the end of optimizer step ``step``, writes ``marker`` and waits (a minute at most) for a signal that
    stops the run, so that a test signals it at a known step. Once: not again when ``marker`` exists."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step or self.marker.exists():
            return
        self.marker.write_text(str(os.getpid()))
        deadline = time.monotonic() + 60
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.01)


class RecordParams(L.Callback):
    """Writes ``<out_dir>/rank<r>.txt``: a hash of this rank's parameters when training ends."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer, pl_module) -> None:
        digest = hashlib.sha1()
        for tensor in pl_module.state_dict().values():
            digest.update(tensor.detach().cpu().numpy().tobytes())
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.txt").write_text(digest.hexdigest())


class PauseAt(L.Callback):
    """At the start of optimizer step ``step``, creates ``<gate>.reached`` and waits until the file ``gate`` exists:
    a run held still at a known point while a test does something beside it."""

    def __init__(self, step: int, gate: str) -> None:
        self.step, self.gate = step, Path(gate)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(f"{self.gate}.reached").touch()
            while not self.gate.exists():
                time.sleep(0.01)


class SignalWhenDecaying(L.Callback):
    """Sends this process signal ``name`` (``SIGINT``: a user's Ctrl-C; ``SIGKILL``) at the end of the first
    optimizer step after a time budget's plan froze and its decay began, while steps remain; in a fresh run only
    (its resume, with the run's saved config, carries this callback too)."""

    def __init__(self, name: str = "SIGINT") -> None:
        self.signal = signal.Signals[name]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        plan = pl_module.budget_plan
        if trainer.ckpt_path is not None or plan is None or not plan.frozen:
            return
        if plan.decay_start < trainer.global_step < plan.total:
            os.kill(os.getpid(), self.signal)


class RecordBarTotal(L.Callback):
    """Writes ``path``: the training progress bar's total and count when training ends, and the epochs begun (JSON)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_end(self, trainer, pl_module) -> None:
        task = trainer.progress_bar_callback.train_progress_bar  # a rich Task
        epochs = trainer.current_epoch + 1
        self.path.write_text(json.dumps({"total": task.total, "completed": task.completed, "epochs": epochs}))
