"""What a run saves: ``last.ckpt`` (its newest state), ``best.ckpt`` (its best weights), ``stable.ckpt`` (a
warmup-stable-decay run's state before its decay), each written atomically."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from gptlit.checkpoint import describe_non_finite
from gptlit.errors import ConfigError, DiskFullError, NonFiniteCheckpointError, NonFiniteError

LAST, BEST, STABLE = "last.ckpt", "best.ckpt", "stable.ckpt"


class LastCheckpoint(Checkpoint):
    """Keeps ``checkpoints/last.ckpt``, the run's newest state: every ``every_n_train_steps``, at the end, and
    when a run is stopped (SIGTERM, or Ctrl-C with :class:`gptlit.training.stopping.GracefulStop`).

    Always that one file, wherever the run directory lives: a run moved or copied elsewhere resumes from its
    own newest state. A step's checkpoint is written at the end of the step, but Lightning writes that step's
    metrics to the logger only after this callback has run (and validation, if due, after that). So it is
    staged as ``.last.ckpt.staged`` and renamed to ``last.ckpt`` when the next step starts (or training ends):
    a run killed in between resumes from the checkpoint before, whose steps are all in the TensorBoard curve,
    and the curve stays one line with every step once. A ``Checkpoint`` for Lightning, which runs its hooks
    after those of other callbacks and of BestCheckpoint (configured before it): a checkpoint saved after a
    validation holds the best score that validation gave.

    Args:
        every_n_train_steps: Save ``last.ckpt`` every this many optimizer steps.
        dirpath: The directory to write to (default: the run's ``checkpoints/``).
    """

    def __init__(self, every_n_train_steps: int = 500, dirpath: str | None = None) -> None:
        if every_n_train_steps < 1:
            raise ConfigError(f"checkpoint.every_n_train_steps must be >= 1, got {every_n_train_steps}")
        self.every_n_train_steps = every_n_train_steps
        self.dirpath = dirpath
        self._saved_step: int | None = None  # global_step of the newest state written
        self._staged: tuple[Path, Path] | None = None  # (written, to become)

    @property
    def state_key(self) -> str:
        # The key gptlit 0.1.0 saved this callback's (empty) state under: Lightning finds it when resuming a 0.1.0
        # checkpoint, instead of warning that a callback of the checkpoint is missing.
        n = self.every_n_train_steps
        key = {
            "monitor": None,
            "mode": "min",
            "every_n_train_steps": n,
            "every_n_epochs": 0,
            "train_time_interval": None,
        }
        return "LastCheckpoint" + repr(key)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = run_checkpoints_dir(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._saved_step = trainer.global_step  # a resumed state is saved already

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._commit(trainer)  # the previous step's metrics (and validation) are written by now

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # The last step's state is saved here too, not only at the end: by on_train_end Lightning has marked
        # the epoch complete, and a run extended from that state (a larger max_steps) would not go on exactly.
        last_step = 0 <= trainer.max_steps <= trainer.global_step
        if trainer.global_step % self.every_n_train_steps == 0 or last_step:
            self._save_if_behind(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Validation of the step just saved: save it again, so that the checkpoint carries its figures
        # (the model card of an export shows them).
        if self._staged is not None and self._saved_step == trainer.global_step and not trainer.sanity_checking:
            self._saved_step = None
            self._save_if_behind(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_if_behind(trainer)  # a run that ended otherwise (max_epochs, max_time)
        self._commit(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._commit(trainer)  # an end-of-step state, whatever went wrong after it
        if isinstance(exception, NonFiniteError):  # its message ends with what to resume from
            exception.last_good = self._last_good()
        # SIGTERMException is raised between batches, so the state is a consistent end-of-step state.
        if isinstance(exception, SIGTERMException):
            self._save_if_behind(trainer)
            self._commit(trainer)
            rank_zero_info(f"Stopped at step {trainer.global_step}; saved {Path(self.dirpath or '.') / LAST}")

    def _save_if_behind(self, trainer: L.Trainer) -> None:
        if self._saved_step == trainer.global_step or trainer.sanity_checking:
            return
        target = Path(self.dirpath or ".") / LAST
        staged = target.with_name(f".{LAST}.staged")
        try:  # every rank takes part; the first writes, atomically (AtomicCheckpointIO)
            trainer.save_checkpoint(staged, weights_only=False)
        except DiskFullError as err:
            err.path = str(target)  # what the user knows it as
            raise
        self._saved_step, self._staged = trainer.global_step, (staged, target)

    def _last_good(self) -> str:
        """``last.ckpt`` and its step, or "" when there is none (every checkpoint written is finite)."""
        target = Path(self.dirpath or ".") / LAST
        try:
            step = torch.load(target, map_location="cpu", weights_only=True, mmap=True)["global_step"]
        except (OSError, RuntimeError, KeyError):
            return ""
        return f"{target} (step {step})"

    def _commit(self, trainer: L.Trainer) -> None:
        if self._staged is not None:
            staged, target = self._staged
            self._staged = None
            if trainer.is_global_zero:  # the rank that wrote it
                os.replace(staged, target)


def run_checkpoints_dir(trainer: L.Trainer) -> str:
    """The run's ``checkpoints/`` directory (every rank must ask: the log directory is a broadcast)."""
    return str(Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints")


class StableCheckpoint(Checkpoint):
    """``checkpoints/stable.ckpt``: a warmup-stable-decay run's state when its decay starts, after its last step at
    the peak rate, written as the step ends (the module's ``decay_start()`` names the step; a cosine run writes
    none). ``fit --ckpt_path stable --trainer.max_steps N`` extends the finished run from there, and it decays
    once, over the last steps of the N; when that run reaches its own decay, stable.ckpt is its state there.
    """

    def __init__(self) -> None:
        self.dirpath: str | None = None
        self._saved_step: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.dirpath = run_checkpoints_dir(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._saved_step = trainer.global_step  # a resumed state is never saved again

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        decay_start = getattr(pl_module, "decay_start", None)
        step = trainer.global_step
        if callable(decay_start) and step != self._saved_step and decay_start() == step:
            # every rank takes part; the first writes, atomically (AtomicCheckpointIO)
            trainer.save_checkpoint(Path(self.dirpath or ".") / STABLE, weights_only=False)
            self._saved_step = step


class BestCheckpoint(ModelCheckpoint):
    """``checkpoints/best.ckpt``: the weights with the lowest ``monitor`` so far, saved right after validation.

    A run moved or copied to another directory keeps its best score: the paths saved in its checkpoint are
    read as this run's own, where Lightning would forget the score and let a worse model replace the best.

    Args:
        monitor: The logged metric to minimize.
    """

    def __init__(self, monitor: str = "val/loss") -> None:
        super().__init__(
            monitor=monitor, mode="min", save_top_k=1, filename="best", enable_version_counter=False, save_last=False
        )

    @property
    def state_key(self) -> str:
        # The key of Lightning's own ModelCheckpoint with these settings, which gptlit 0.1.0 saved it under.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_dir = state_dict.get("dirpath")
        if saved_dir and self.dirpath and saved_dir != self.dirpath:
            state_dict = relocate(state_dict, saved_dir, self.dirpath)
        super().load_state_dict(state_dict)


def relocate(state: Any, old_dir: str, new_dir: str) -> Any:
    """``state`` with every path inside ``old_dir`` (in values and in dict keys) moved into ``new_dir``."""
    if isinstance(state, str):
        return new_dir + state[len(old_dir) :] if state == old_dir or state.startswith(old_dir + os.sep) else state
    if isinstance(state, dict):
        return {relocate(k, old_dir, new_dir): relocate(v, old_dir, new_dir) for k, v in state.items()}
    return state


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, syncs it to disk, then renames it into place.

    A process killed mid-write leaves the previous checkpoint intact (a rename within a directory is atomic);
    Lightning's own writer stages the file in the system temp directory, which may be another file system.
    A checkpoint whose weights or optimizer state hold a NaN or an infinity is not written
    (:class:`gptlit.errors.NonFiniteCheckpointError`); a write that fails for lack of space removes its
    temporary file and says how much space the checkpoint needs (:class:`gptlit.errors.DiskFullError`).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        problem = describe_non_finite(checkpoint)
        if problem:
            raise NonFiniteCheckpointError(
                f"training diverged at step {checkpoint.get('global_step')}: {problem}, so they were not saved; "
                "lower the learning rate (model.learning_rate, and model.muon_lr with Muon) or use "
                "trainer.precision 32-true"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f"{'' if path.name.startswith('.') else '.'}{path.name}.partial")
        try:
            with open(staging, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as err:
            written = staging.stat().st_size if staging.is_file() else 0
            staging.unlink(missing_ok=True)  # a full disk must not stay full of it
            if not isinstance(err, (OSError, RuntimeError)):
                raise
            needed, free = max(written, checkpoint_nbytes(checkpoint)), shutil.disk_usage(path.parent).free
            if is_disk_full(err, free, needed):
                raise DiskFullError(str(path), needed, free) from err
            raise
        os.replace(staging, path)


def is_disk_full(err: BaseException, free: int, needed: int) -> bool:
    """Whether a write failed for lack of space: ENOSPC or EDQUOT (torch.save raises a RuntimeError about an
    ``unexpected pos`` with that OSError as its context), or such a RuntimeError with no context while the disk
    has less space free than the file needs."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        cause = cause.__cause__ or cause.__context__
    return isinstance(err, RuntimeError) and "unexpected pos" in str(err) and free < needed


def checkpoint_nbytes(state: Any, seen: set[int] | None = None) -> int:
    """The bytes of the tensor storages (each once) and strings of a checkpoint: about the size of its file."""
    seen = set() if seen is None else seen
    if isinstance(state, (str, bytes)):
        return len(state)
    if isinstance(state, torch.Tensor):
        storage = state.untyped_storage()
        key = storage.data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(state, dict):
        return sum(checkpoint_nbytes(v, seen) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(checkpoint_nbytes(v, seen) for v in state)
    return 0
