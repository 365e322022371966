"""gptlit's error types: problems with what gptlit was given, each told in one line that says what to do.

The command line prints these (and the parser's own errors) as one ``gptlit: error: ...`` line. Any other
exception is a bug, in gptlit or in an edit of it, and keeps its traceback.
"""

from __future__ import annotations

import math


class GptlitError(Exception):
    """A problem with gptlit's input or environment, not a bug: reported as one line."""


class UsageError(GptlitError, ValueError):
    """A mistake in how gptlit was called: an argument, a path, a checkpoint that does not fit."""


class ConfigError(UsageError):
    """A command line or config file that the parser or a config class rejects."""


class DataError(UsageError):
    """A problem with the data or its files, told in one line that names the file and what to do."""


class MissingFileError(DataError, FileNotFoundError):
    """A file gptlit needs does not exist."""


class NonFiniteError(GptlitError, RuntimeError):
    """Training became NaN or infinite: in the loss, or in the weights or optimizer state about to be saved.

    The message says what went wrong and what to change; the run's checkpoint callback sets ``last_good`` (the
    newest checkpoint it kept, and its step), and the message ends by saying what to resume from.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        # "<path> (step N)"; "" when the run kept no checkpoint; None when no callback told.
        self.last_good: str | None = None

    def __str__(self) -> str:
        if self.last_good:
            then = f"resume with --ckpt_path last from the last good checkpoint, {self.last_good}"
        elif self.last_good == "":
            then = "start the run afresh (--overwrite true): it saved no checkpoint before this"
        else:
            then = "resume with --ckpt_path last from the last checkpoint saved before this"
        return f"{self.args[0]}, then {then}"


class NonFiniteLossError(NonFiniteError):
    """The training loss became NaN or infinite."""


class NonFiniteCheckpointError(NonFiniteError):
    """A checkpoint about to be written holds NaN or infinite weights or optimizer state: it is not written."""


class DiskFullError(GptlitError):
    """A file could not be written for lack of space: told with the file, the space it needs and the space free.

    Args:
        path: The file that was not written (set by a caller that writes under another name first).
        needed: About how many bytes it needs.
        free: How many bytes its disk has free.
    """

    def __init__(self, path: str, needed: int, free: int) -> None:
        super().__init__(path, needed, free)
        self.path, self.needed, self.free = path, needed, free

    def __str__(self) -> str:
        mib = 2**20
        needed = math.ceil(self.needed / mib * 10) / 10  # rounded up: 0.45 MiB needs 0.5
        return (
            f"cannot write {self.path}: no space left on its disk (it needs about {needed} MiB, "
            f"{self.free / mib:.1f} MiB are free); free some space, or move the run to another disk "
            "(--trainer.default_root_dir), then resume with --ckpt_path last"
        )
