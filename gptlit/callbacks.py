"""Callbacks: checkpoints a run can always resume from, and a clean stop on Ctrl-C."""

from __future__ import annotations

import signal
import threading
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class LastCheckpoint(ModelCheckpoint):
    """Keeps ``checkpoints/last.ckpt``: every ``every_n_train_steps``, at the end, and when a run is stopped.

    Lightning's own ``save_last`` skips the final step once an earlier checkpoint exists, and saves nothing
    when SIGTERM (or, with :class:`GracefulStop`, Ctrl-C) ends a run; both are covered here.

    Args:
        every_n_train_steps: Save ``last.ckpt`` every this many optimizer steps.
        kwargs: Further ``ModelCheckpoint`` arguments.
    """

    def __init__(self, every_n_train_steps: int = 500, **kwargs: Any) -> None:
        kwargs.setdefault("enable_version_counter", False)  # never last-v1.ckpt
        super().__init__(every_n_train_steps=every_n_train_steps, save_last=True, save_top_k=0, **kwargs)

    def _save_last_if_behind(self, trainer: L.Trainer) -> None:
        if self._last_global_step_saved != trainer.global_step and not trainer.sanity_checking:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_last_if_behind(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # SIGTERMException is raised between batches, so the state is a consistent end-of-step state.
        if isinstance(exception, SIGTERMException):
            self._save_last_if_behind(trainer)
            rank_zero_info(f"Stopped at step {trainer.global_step}; saved {self.last_model_path}")


def best_checkpoint(monitor: str = "val/loss") -> ModelCheckpoint:
    """``checkpoints/best.ckpt``: the weights with the lowest ``monitor`` so far, saved right after validation."""
    return ModelCheckpoint(
        monitor=monitor,
        mode="min",
        save_top_k=1,
        filename="best",
        enable_version_counter=False,
        save_last=False,
    )


class GracefulStop(L.Callback):
    """Turns the first Ctrl-C (SIGINT) into Lightning's SIGTERM stop, which ends the run between two batches.

    A KeyboardInterrupt could land in the middle of an optimizer step; a flag checked at the end of a batch
    cannot. A second Ctrl-C interrupts at once.
    """

    def __init__(self) -> None:
        self._previous = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame) -> None:
            if trainer.received_sigterm:
                raise KeyboardInterrupt
            rank_zero_info("\nCtrl-C: stopping after this batch and saving last.ckpt (Ctrl-C again to abort)")
            trainer._signal_connector.received_sigterm = True

        self._previous = signal.signal(signal.SIGINT, handler)

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()
