"""Directory locks: a run directory, or a data directory, is changed by one process at a time.

A lock is ``fcntl.flock`` on ``<directory>/.lock``. The operating system drops it when its process ends, however
it ends (``kill -9`` included), so no lock is ever left stale. The holder writes its pid, host and command line
into the file; another process that finds the directory locked names the holder from it. The holder removes the
file (and any directory it created for it) when it lets go; a process that was waiting on the removed file sees
that and locks the new one. Within one process a lock is re-entrant: taking it again adds a hold. A forked
child (a DataLoader worker) does not hold its parent's locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from gptlit.errors import UsageError

LOCK_FILE = ".lock"

_held: dict[Path, DirectoryLock] = {}  # this process's locks, by directory


class DirectoryBusyError(UsageError):
    """Another process holds the lock of a directory this process was about to change."""


def _command_line() -> str:
    """This process's command, as the user typed it: ``python -m gptlit fit ...`` rather than ``.../__main__.py``."""
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    name = f"python -m {program.parent.name}" if program.name == "__main__.py" else program.name
    return " ".join([name, *map(shlex.quote, sys.argv[1:])])


def holder(directory: str | Path) -> str:
    """Who holds the lock of ``directory``, as its lock file says: ``pid 123 on host (python -m gptlit fit)``."""
    try:
        record = json.loads((Path(directory) / LOCK_FILE).read_text(encoding="utf-8"))
        return f"pid {record['pid']} on {record['host']} ({record['command']})"
    except (OSError, ValueError, KeyError, TypeError):  # gone, or being written this very moment
        return "another process"


class DirectoryLock:
    """A held lock on ``directory`` (see the module docstring); ``release`` it, or use it as a context manager."""

    def __init__(self, directory: Path, fd: int, created: list[Path]) -> None:
        self.directory, self.fd, self.created, self.holds = directory, fd, created, 1

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def clear(self) -> None:
        """Remove everything in the directory but the lock file (what ``shutil.rmtree`` would, keeping the lock)."""
        for path in self.directory.iterdir():
            if path.name == LOCK_FILE:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()

    def release(self) -> None:
        """Drop one hold; the last one removes the lock file, unlocks, and removes the directories it created."""
        self.holds -= 1
        if self.holds > 0:
            return
        _held.pop(self.directory, None)
        with contextlib.suppress(OSError):
            (self.directory / LOCK_FILE).unlink()  # while still locked: a waiter then finds its file gone
        os.close(self.fd)
        for directory in self.created:  # deepest first; one holding anything else stays
            try:
                directory.rmdir()
            except OSError:
                break


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) shares its parent's locks: it closes its copies, so that the locks
    end with the parent, as they would were the child not there."""
    for lock in _held.values():
        os.close(lock.fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def _missing_parents(directory: Path) -> list[Path]:
    """``directory`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    return missing


def _open_locked(path: Path, wait: bool, on_wait: Callable[[str], None] | None) -> int | None:
    """An open descriptor of ``path`` holding its lock, or None when another process holds it and ``wait`` is
    false. Tells ``on_wait`` whom it waits for, before it starts waiting."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        if not wait:
            os.close(fd)
            return None
    if on_wait is not None:
        on_wait(holder(path.parent))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def lock_directory(
    directory: str | Path, wait: bool = False, on_wait: Callable[[str], None] | None = None, advice: str = ""
) -> DirectoryLock:
    """Lock ``directory`` (created if missing) for this process.

    When another process holds it: with ``wait``, tell ``on_wait`` (once) who holds it and wait for it; without,
    raise :class:`DirectoryBusyError` naming the holder, followed by ``advice``. An ``OSError`` from creating the
    directory or its lock file propagates.
    """
    directory = Path(os.path.abspath(directory))
    if directory in _held:
        _held[directory].holds += 1
        return _held[directory]
    created = _missing_parents(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    while True:
        fd = _open_locked(path, wait, on_wait)
        if fd is None:
            busy = f"{directory} is in use by {holder(directory)}"
            raise DirectoryBusyError(f"{busy}; {advice}" if advice else busy)
        on_wait = None  # said once
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # still the directory's lock file: not one its last holder removed as this one waited
        os.close(fd)
    lock = _held[directory] = DirectoryLock(directory, fd, created)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command_line()}
    try:
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
    except OSError as err:  # a full disk: let go of the lock (and its file) as if never taken
        lock.release()
        err.filename = err.filename or str(path)
        raise
    return lock
