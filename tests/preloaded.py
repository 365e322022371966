"""Real gptlit processes to SIGKILL, started in milliseconds instead of seconds.

``python tests/preloaded.py`` imports gptlit (and Lightning: ~4 s) once, then forks a fresh child for each
command it is sent; the child runs ``cli_main(args)`` as ``python -m gptlit <args>`` would, in its own
process, with its output in a log file. The crash tests kill these children with real signals at random
moments; only the import time is shared. Nothing has run torch code in the parent, so forking it is safe.

One JSON line each way on stdin/stdout, after the server's ``{"ready": true}``:
    {"run": [args...], "cwd": DIR, "log": FILE}  ->  {"pid": PID}
        optionally with "pause": {"event", "count", "under", "marker"} (see _pause_at) and "no_exchange": true
        (gptlit.export.swap without its one-step exchange: the two renames that replace it elsewhere)
    {"wait": PID}                                  ->  {"code": EXIT}   (negative: killed by that signal)
    {"poll": PID}                                  ->  {"code": EXIT or null while it runs}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path


def _pause_at(event: str, count: int, under: str, marker: str) -> None:
    """Stop for good just before the ``count``-th audit ``event`` (``open``, ``os.remove``, ``os.rename``, ...)
    counted from the first directory made inside ``under``, having created ``marker``: the moment to kill."""
    seen, armed, paused = 0, False, False

    def hook(name: str, args: tuple) -> None:
        nonlocal seen, armed, paused
        armed = armed or (name == "os.mkdir" and str(args[0]).startswith(under + os.sep))
        if armed and not paused and name == event:
            seen += 1
            if seen == count:
                paused = True  # creating the marker is an audit event too
                Path(marker).touch()
                while True:
                    time.sleep(1)  # until a signal: its handler's exception leaves from here

    sys.addaudithook(hook)


def _child(args: list[str], cwd: str, log: str, pause: dict | None = None, no_exchange: bool = False) -> None:
    from gptlit.cli.main import cli_main

    os.chdir(cwd)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.argv = ["gptlit", *args]
    code = 0
    try:
        if no_exchange:
            import gptlit.export.swap

            gptlit.export.swap._exchange = lambda a, b: False
        if pause is not None:
            _pause_at(**pause)
        cli_main(args)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    import gptlit.cli.main  # noqa: F401 -- the import every child would otherwise pay for, done once here

    def reply(message: dict) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    reply({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        if "run" in request:
            pid = os.fork()
            if pid == 0:
                _child(request["run"], request["cwd"], request["log"], request.get("pause"), request.get("no_exchange"))
            reply({"pid": pid})
        elif "wait" in request:
            _, status = os.waitpid(request["wait"], 0)
            reply({"code": os.waitstatus_to_exitcode(status)})
        elif "poll" in request:
            pid, status = os.waitpid(request["poll"], os.WNOHANG)
            reply({"code": os.waitstatus_to_exitcode(status) if pid else None})


class Preloaded:
    """The test side: ``start`` a gptlit command in a fresh process, ``wait`` for its exit code."""

    def __init__(self, env: dict[str, str]) -> None:
        self.server = subprocess.Popen(
            [sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        assert self.server.stdout is not None
        assert json.loads(self.server.stdout.readline()) == {"ready": True}  # imports done: starts are quick now

    def _ask(self, request: dict) -> dict:
        assert self.server.stdin is not None and self.server.stdout is not None
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        return json.loads(self.server.stdout.readline())

    def start(self, args: list[str], cwd: Path, log: Path, **options) -> int:
        """A fresh process running ``args``; ``options``: ``pause``, ``no_exchange`` (see the module's doc)."""
        return self._ask({"run": list(args), "cwd": str(cwd), "log": str(log), **options})["pid"]

    def wait(self, pid: int) -> int:
        return self._ask({"wait": pid})["code"]

    def poll(self, pid: int) -> int | None:
        """The exit code once the process has ended (then ``wait`` must not be asked), else None."""
        return self._ask({"poll": pid})["code"]

    def close(self) -> None:
        assert self.server.stdin is not None
        self.server.stdin.close()
        self.server.wait(timeout=30)


if __name__ == "__main__":
    serve()
