"""A directory written whole beside its place, then swapped in: at every instant the place holds the complete
old directory or the complete new one (or, between the two renames that stand in for a one-step exchange where the
system has none, the old one waits beside it), and nothing is left behind.

``staged(target)`` makes ``.<name>.gptlit-staging-<16 hex digits>`` beside ``target`` (its mode from the umask)
and holds it locked while in use. ``swap_in(staging, target)`` exchanges the two in one step where
the system can (Linux ``renameat2(RENAME_EXCHANGE)``); elsewhere it moves ``target`` aside to
``.<name>.gptlit-previous`` and ``staging`` into place, two renames. Either way the old directory ends up at the
staging path, which ``staged`` removes on every exit that runs code: a return, an exception, Ctrl-C, and SIGTERM
(made to raise ``SystemExit(143)`` meanwhile; its default ends the process without running ``finally``).

A process killed outright (``kill -9``, a lost machine) leaves them behind. ``clean_beside(target)``, which the
caller runs before it looks at ``target`` and ``staged`` runs at its end, puts a previous directory back where
``target`` is missing (killed between the two renames) or removes it (killed after them), and removes the
staging directories that no live process holds locked (a killed process's lock goes with it).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_AT_FDCWD = -100  # Linux: paths relative to the working directory
_RENAME_EXCHANGE = 2


def staging_pattern(target: Path) -> re.Pattern[str]:
    """The names of ``target``'s staging directories."""
    return re.compile(re.escape(f".{target.name}.gptlit-staging-") + "[0-9a-f]{16}")


def _previous(target: Path) -> Path:
    return target.with_name(f".{target.name}.gptlit-previous")


@contextmanager
def staged(target: Path) -> Iterator[Path]:
    """A new, empty staging directory beside ``target`` (whose parent must exist), removed on every exit that
    runs code, with whatever ``swap_in`` moved into it; then ``clean_beside(target)``."""
    with _sigterm_raises():
        staging = target.with_name(f".{target.name}.gptlit-staging-{secrets.token_hex(8)}")
        lock = None
        try:
            staging.mkdir()  # 0777 less the umask, as the user's directories are (tempfile.mkdtemp's are 0700)
            lock = os.open(staging, os.O_RDONLY)
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if lock is not None:
                os.close(lock)
            clean_beside(target)


def swap_in(staging: Path, target: Path) -> None:
    """Put the complete directory ``staging`` at ``target``; a directory that was at ``target`` (its mode kept by
    the new one) ends up at ``staging``."""
    if not target.exists():
        staging.rename(target)
        return
    shutil.copymode(target, staging)
    if _exchange(staging, target):
        return
    aside = _previous(target)
    target.rename(aside)
    staging.rename(target)  # killed just before this: clean_beside moves `aside` back
    aside.rename(staging)


def clean_beside(target: Path) -> None:
    """Repair what a killed ``staged``/``swap_in`` left beside ``target``: a previous directory goes back to a
    missing ``target`` or is removed; staging directories no live process holds are removed."""
    aside = _previous(target)
    if aside.is_dir() and not aside.is_symlink():
        if target.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.rename(target)
    pattern = staging_pattern(target)
    for entry in target.parent.iterdir():
        if pattern.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink() and not _held(entry):
            shutil.rmtree(entry, ignore_errors=True)


def _held(directory: Path) -> bool:
    """Whether a live process holds ``directory`` locked (``staged``'s lock)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # removed meanwhile
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where this
    system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28, musl >= 1.2.5
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a kernel or file system without it
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Meanwhile SIGTERM raises ``SystemExit(143)``, so that ``finally`` blocks run (in the main thread only,
    where Python runs signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _exit_on_signal(signum: int, frame) -> None:
    print(f"gptlit: stopped by {signal.Signals(signum).name}", file=sys.stderr)
    raise SystemExit(128 + signum)
