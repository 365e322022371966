"""GracefulStop: the first Ctrl-C ends a run between two batches, with ``last.ckpt`` saved."""

from __future__ import annotations

import signal
import threading

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from gptlit.lightning_private import request_stop


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
