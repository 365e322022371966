"""TrialReport: what a trial's ``fit`` tells the tune process that started it, through a file.

The trial's ``fit`` runs in a process of its own, which knows nothing of Optuna or of the study's storage (whose
URL may hold a database password: it stays out of the trial's ``config.yaml``). It appends each validation's
score to a file in its run directory; the tune process reads it, reports it to Optuna, and stops the trial (with
SIGTERM, which saves ``last.ckpt`` as usual) when Optuna prunes it.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import lightning as L

REPORT_FILE = "tune-report.jsonl"  # in the trial's run directory


class TrialReport(L.Callback):
    """Appends ``{"step": S, "value": V}`` to ``path`` after every validation (``metric``'s value), and stops the
    run when the tune process that started it is gone (killed outright, its trial lost: nothing would read on).

    Args:
        path: The file to append to.
        metric: The logged metric to report (lower is better).
    """

    def __init__(self, path: str, metric: str = "val/bpb") -> None:
        self.path, self.metric = path, metric
        self._parent: int | None = None
        self._stopping = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._parent = os.getppid()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if trainer.sanity_checking or value is None or not trainer.is_global_zero:
            return
        with open(self.path, "a", encoding="utf-8") as report:
            report.write(json.dumps({"step": trainer.global_step, "value": float(value)}) + "\n")

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if not self._stopping and self._parent is not None and os.getppid() != self._parent:
            self._stopping = True  # stop as SIGTERM stops a run: after this batch, last.ckpt saved
            os.kill(os.getpid(), signal.SIGTERM)
