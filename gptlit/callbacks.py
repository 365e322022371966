"""Callbacks: checkpoints a run can always resume from, a clean stop on Ctrl-C, and stories in TensorBoard."""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from gptlit.generate import generate


class LastCheckpoint(ModelCheckpoint):
    """Keeps ``checkpoints/last.ckpt``: every ``every_n_train_steps``, at the end, and when a run is stopped.

    Lightning's own ``save_last`` skips the final step once an earlier checkpoint exists, and saves nothing
    when SIGTERM (or, with :class:`GracefulStop`, Ctrl-C) ends a run; both are covered here.

    A step's checkpoint is written at the end of the step, but Lightning writes that step's metrics to the
    logger only after this callback has run (and validation, if due, after that). So the checkpoint is staged
    as ``.last.ckpt.staged`` and renamed to ``last.ckpt`` when the next step starts (or training ends): a run
    killed in between resumes from the checkpoint before, whose steps are all in the TensorBoard curve, and the
    curve stays one line with every step once.

    Args:
        every_n_train_steps: Save ``last.ckpt`` every this many optimizer steps.
        kwargs: Further ``ModelCheckpoint`` arguments.
    """

    def __init__(self, every_n_train_steps: int = 500, **kwargs: Any) -> None:
        kwargs.setdefault("enable_version_counter", False)  # never last-v1.ckpt
        super().__init__(every_n_train_steps=every_n_train_steps, save_last=True, save_top_k=0, **kwargs)
        self._staged: tuple[Path, Path] | None = None  # (written, to become)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        target = Path(filepath)
        staged = target.with_name(f".{target.name}.staged")
        super()._save_checkpoint(trainer, str(staged))  # written atomically by AtomicCheckpointIO
        self._staged = (staged, target)

    def _commit(self, trainer: L.Trainer) -> None:
        if self._staged is not None:
            staged, target = self._staged
            self._staged = None
            if trainer.is_global_zero:  # the rank that wrote it
                os.replace(staged, target)

    def _save_last_if_behind(self, trainer: L.Trainer) -> None:
        if self._last_global_step_saved != trainer.global_step and not trainer.sanity_checking:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._commit(trainer)  # the previous step's metrics (and validation) are written by now

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_last_if_behind(trainer)
        self._commit(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._commit(trainer)  # an end-of-step state, whatever went wrong after it
        # SIGTERMException is raised between batches, so the state is a consistent end-of-step state.
        if isinstance(exception, SIGTERMException):
            self._save_last_if_behind(trainer)
            self._commit(trainer)
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

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()


DEFAULT_PROMPTS = ("Once upon a time", "Lily and Ben went to the park.", "The little dog")

# Characters that TensorBoard's markdown would read as formatting (it escapes HTML itself).
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]>#])")


def _escape_markdown(text: str) -> str:
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def sample_markdown(prompt: str, continuation: str) -> str:
    """A sample as TensorBoard markdown: the prompt in bold, then the model's text, line breaks kept."""
    text = f"**{_escape_markdown(prompt)}**{_escape_markdown(continuation)}"
    return text.replace("\n", "  \n")  # two trailing spaces: a hard line break in markdown


class TextSamples(L.Callback):
    """Writes a few stories to TensorBoard (the Text tab) after validation, to read how the model sounds.

    Each prompt is continued with the same seed every time, so samples of one run differ only because the
    weights changed. Sampling uses a private random generator: training goes on exactly as without this
    callback. Only rank 0 samples, and only into a ``TensorBoardLogger``.

    Args:
        prompts: Beginnings of the stories; sample ``i`` is logged as ``samples/i``.
        max_new_tokens: Tokens to write per story, fewer if the model ends it (``<eos>``).
        temperature: Softmax temperature; 0 is greedy.
        top_k: Sample among the k most likely tokens only (None: all).
        seed: Seed of the sampling generator.
        every_n_validations: Sample at the first validation and every n-th after it (counted from the
            start of this process, so a resumed run samples at its first validation again).
    """

    def __init__(
        self,
        prompts: Sequence[str] = DEFAULT_PROMPTS,
        max_new_tokens: int = 100,
        temperature: float = 0.8,
        top_k: int | None = 40,
        seed: int = 0,
        every_n_validations: int = 1,
    ) -> None:
        if every_n_validations < 1:
            raise ValueError(f"every_n_validations must be >= 1, got {every_n_validations}")
        self.prompts = list(prompts)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed
        self.every_n_validations = every_n_validations
        self._validations = 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        due = self._validations % self.every_n_validations == 0
        self._validations += 1
        tokenizer = getattr(pl_module, "tokenizer", None)
        loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not (due and trainer.is_global_zero and loggers and tokenizer is not None):
            return
        for i, prompt in enumerate(self.prompts):
            # generate restores the model's train/eval mode and, with a seed, leaves the global RNG alone.
            (new_ids,) = generate(
                pl_module.model,
                tokenizer.encode(prompt, bos=True),
                self.max_new_tokens,
                temperature=self.temperature,
                top_k=self.top_k,
                eos_id=tokenizer.eos_id,
                seed=self.seed,
            )
            text = sample_markdown(prompt, tokenizer.decode(new_ids))
            for logger in loggers:
                logger.experiment.add_text(f"samples/{i}", text, global_step=trainer.global_step)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, syncs it to disk, then renames it into place.

    A process killed mid-write leaves the previous checkpoint intact (a rename within a directory is atomic);
    Lightning's own writer stages the file in the system temp directory, which may be another file system.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f"{'' if path.name.startswith('.') else '.'}{path.name}.partial")
        with open(staging, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, path)


class SaveRunConfig(SaveConfigCallback):
    """Writes the run's ``config.yaml`` when training starts, atomically; ``validate``/``test`` leave it alone.

    Lightning's ``SaveConfigCallback`` writes it at setup, before a resumed checkpoint is loaded and checked:
    a resume refused there (another tokenizer, a model of another size) would already have replaced the run's
    config with the refused one, which ``fit --ckpt_path last`` then reads. Staged beside the target and
    renamed into place, as checkpoints are, so a kill mid-write leaves the previous file.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pass  # see on_train_start

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # a broadcast: every rank must ask
        if not trainer.is_global_zero or log_dir is None:
            return
        path = Path(log_dir) / self.config_filename
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f"{'' if path.name.startswith('.') else '.'}{path.name}.partial")
        self.parser.save(self.config, str(staging), skip_none=False, overwrite=True, multifile=self.multifile)
        os.replace(staging, path)
