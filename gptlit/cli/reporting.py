"""What the command line says when something goes wrong, in one line, and the messages of other libraries it
leaves out."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import NoReturn

# Errors of the machine, not of gptlit: reported in one line too.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"gptlit: error: {' '.join(message.split())}", file=sys.stderr)  # one line
    raise SystemExit(code)


def failed_file(err: OSError) -> str | None:
    """The file an OSError is about: its ``filename``, else the innermost frame's local naming a file or path (a
    writer that meets a full disk when it flushes or closes, TensorBoard's among them, gives no filename)."""
    if err.filename:
        return os.fsdecode(err.filename)
    frames, tb = [], err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for name in ("filename", "file", "path", "f"):
            value = frame.f_locals.get(name)
            value = value if isinstance(value, (str, bytes, os.PathLike)) else getattr(value, "name", None)
            if isinstance(value, (str, bytes, os.PathLike)) and os.fspath(value):
                return os.fsdecode(value)
    return None


def environment_failure(err: OSError) -> str:
    """One line for an error of the machine (a full disk, a read-only directory): the file, and the free space."""
    file = failed_file(err)
    where, free = f": {file}" if file else "", ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        with contextlib.suppress(OSError):
            free = f" ({shutil.disk_usage(nearest_existing(Path(file or '.'))).free / 2**20:.1f} MiB free there)"
    return f"{err.strerror or err}{where}{free}; check that the path is writable and has free space"


def quiet_thread_errors(args: threading.ExceptHookArgs) -> None:
    """A thread's full disk is told by the main thread, in one line: TensorBoard's writer thread raises its error
    again in the main thread's next write. Any other error of a thread keeps its traceback."""
    if not (isinstance(args.exc_value, OSError) and args.exc_value.errno in ENVIRONMENT_ERRNOS):
        threading.__excepthook__(args)


def _no_tips(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("💡 Tip:")  # Lightning's advertisements for its cloud services


def silence_other_libraries() -> None:
    """Silence the messages of other libraries that tell a gptlit user nothing true or useful, each by its text."""
    # gptlit passes the command line on explicitly (it may add the resumed run's config).
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
    # Lightning's own use of a torch API, on every run.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # best.ckpt's directory is the run's own, which holds last.ckpt: said on every resume.
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
    # Under bf16-mixed the weights are float32, the size the summary gives.
    warnings.filterwarnings("ignore", message="Precision bf16-mixed is not supported by the model summary")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_tips)


def nearest_existing(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
