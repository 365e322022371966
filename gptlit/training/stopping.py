"""How a run ends: GracefulStop (the first Ctrl-C ends it between two batches, with ``last.ckpt`` saved), and
ValidateAtEnd (a run that reaches max_steps ends with a validation)."""

from __future__ import annotations

import signal
import threading
from typing import Any

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from gptlit.training.lightning_private import request_stop, resume_after_validation


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
            request_stop(trainer)

        self._previous = signal.signal(signal.SIGINT, handler)

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()


class ValidateAtEnd(L.Callback):
    """A run that reaches ``max_steps`` ends with a validation of its last step, whatever ``val_check_interval``
    is: ``best.ckpt`` and the last validation figures are of the run's end, also when it is extended.

    Lightning validates when a run is asked to stop (``trainer.should_stop``), which this asks for at the last
    step. A run extended from the state saved after that validation is told so (Lightning would take it for a
    state saved before the validation, and log the extended run's steps one too early).
    """

    def __init__(self) -> None:
        self._ended_at: int | None = None  # the step a run ended at, with a validation asked for

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._ended_at == trainer.global_step and trainer.enable_validation:
            resume_after_validation(trainer)
        self._ended_at = None

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if 0 <= trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True
            self._ended_at = trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        return {} if self._ended_at is None else {"ended_at": self._ended_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._ended_at = state_dict.get("ended_at")
