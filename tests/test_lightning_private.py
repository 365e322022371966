"""The private Lightning API that gptlit relies on (gptlit/training/lightning_private.py): each behaviour pinned
here, so that a Lightning upgrade that changes one fails by name."""

from __future__ import annotations

import inspect
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gptlit.cli.main import GPTLitCLI
from gptlit.training.lightning_private import (
    KeepConfigOverCheckpoint,
    request_stop,
    resume_after_validation,
    set_max_steps,
)


class StopAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step, self.exceptions, self.batches_started = step, [], 0

    def on_train_batch_start(self, trainer, *args) -> None:
        self.batches_started += 1

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            request_stop(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.exceptions.append(exception)


def test_request_stop_ends_training_between_two_batches() -> None:
    """What GracefulStop needs: the flag makes Lightning raise SIGTERMException after the current batch, with
    callbacks' on_exception called first (LastCheckpoint saves there), and the epoch not marked complete."""
    stop = StopAt(step=3)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=10,
        callbacks=[stop],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    with pytest.raises(SIGTERMException):
        trainer.fit(BoringModel(), datamodule=BoringDataModule())
    assert trainer.global_step == 3 and stop.batches_started == 3
    assert [type(e) for e in stop.exceptions] == [SIGTERMException]
    assert trainer.fit_loop.epoch_progress.current.completed == 0


def test_lightning_cli_still_reads_hyperparameters_through_the_method_gptlit_replaces() -> None:
    """LightningCLI loads --ckpt_path hyperparameters in ``_parse_ckpt_path``, called from ``__init__``; gptlit's
    CLI replaces it with a no-op (the behaviour: tests/test_cli.py, resuming into another model shape)."""
    assert "self._parse_ckpt_path()" in inspect.getsource(LightningCLI.__init__)
    assert GPTLitCLI._parse_ckpt_path is KeepConfigOverCheckpoint._parse_ckpt_path


def test_set_max_steps_ends_a_running_fit_there() -> None:
    """What TimeBudget needs: a max_steps changed during fit ends it there, and trainer.max_steps reads it."""

    class Shorten(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 2:
                set_max_steps(trainer, 5)

    trainer = L.Trainer(
        accelerator="cpu", max_steps=50, callbacks=[Shorten()], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(BoringModel(), datamodule=BoringDataModule())
    assert trainer.global_step == 5 == trainer.max_steps


class ValidatedEnd(L.Callback):
    """Asks for a validation at the last step (as gptlit's ValidateAtEnd) and saves during it (as LastCheckpoint)."""

    def __init__(self, path: Path, resume: bool = False) -> None:
        self.path, self.resume = path, resume

    def on_train_start(self, trainer, pl_module) -> None:
        if self.resume:
            resume_after_validation(trainer)

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == trainer.max_steps:
            trainer.should_stop = True

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.global_step == 3:
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("resume", [False, True], ids=["lightning", "told"])
def test_a_run_resumed_from_a_validation_lightning_did_not_schedule_needs_telling(tmp_path: Path, resume) -> None:
    """What ValidateAtEnd needs: Lightning validates when asked to stop, and a run resumed from a state saved during
    that validation counts the stepped batches (the step of logged metrics) on only when told it was validated."""

    def fit(max_steps: int, callback: L.Callback, ckpt_path: Path | None = None) -> L.Trainer:
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=max_steps,
            val_check_interval=10,
            limit_val_batches=1,
            num_sanity_val_steps=0,
            callbacks=[callback],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(BoringModel(), datamodule=BoringDataModule(), ckpt_path=ckpt_path)
        return trainer

    path = tmp_path / "end.ckpt"
    fit(3, ValidatedEnd(path))
    assert path.is_file()  # validated at step 3, which val_check_interval 10 would not
    resumed = fit(5, ValidatedEnd(path, resume), ckpt_path=path)
    assert resumed.fit_loop.epoch_loop._batches_that_stepped == (5 if resume else 4)


def test_lightning_cli_runs_a_cli_method_named_after_the_subcommand() -> None:
    """GPTLitCLI.fit wraps trainer.fit (a stopped run names the command that resumes it): LightningCLI calls a
    method of the CLI named after the subcommand in place of the Trainer's (the behaviour: tests/test_train.py,
    the stop message)."""
    assert "getattr(self, subcommand, default)" in inspect.getsource(LightningCLI._run_subcommand)
    assert "fit" in vars(GPTLitCLI)
