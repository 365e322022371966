"""``python -m gptlit`` without paying for its imports each time: a process that imports gptlit's command line
once, then forks a child for each command it is sent.

A child is ``python -m gptlit ARGS`` from the import on: it runs ``runpy._run_module_as_main("gptlit")``, as the
interpreter's ``-m`` does, in the directory it is given, with stdout and stderr going to the files it is given and
stdin from /dev/null; an exception it does not catch prints its traceback and exits 1, and ``atexit`` handlers
run, as in a process of its own. The parent has run no torch operation before it forks (no thread pool to
inherit). Used by tests/test_bad_inputs.py, whose rows differ only in their command and workspace.

Protocol, one JSON object a line: ``{"cwd", "args", "stdout", "stderr"}`` in, ``{"code": exit code}`` out.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

TIMEOUT_S = 300


def run_child(request: dict) -> None:
    """In the forked child: become ``python -m gptlit *args`` (never returns)."""
    signal.alarm(TIMEOUT_S)
    os.chdir(request["cwd"])
    sys.path[0] = request["cwd"]  # where `python -m` puts the directory it runs in
    for fd, path, flags in (
        (0, os.devnull, os.O_RDONLY),
        (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
    ):
        os.dup2(os.open(path, flags, 0o644), fd)
    sys.argv = ["-m", *request["args"]]
    runpy._run_module_as_main("gptlit")  # what `python -m gptlit` runs; sets sys.argv[0] to the module's path
    sys.exit(0)


def serve() -> None:
    import gptlit.cli.main  # noqa: F401  the imports every child shares

    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything printed here goes to stderr, not into the replies
    for line in sys.stdin:
        sys.stdout.flush(), sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_child(json.loads(line))
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


class ForkedCli:
    """A client: ``run(cwd, args)`` gives what ``subprocess.run(["python", "-m", "gptlit", *args])`` would in
    ``cwd``; the child's output goes through ``stdout.txt`` and ``stderr.txt`` beside ``cwd``, not in it."""

    def __init__(self, env: dict[str, str]) -> None:
        command = [sys.executable, __file__]
        self.server = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, cwd: Path, args: list[str]) -> subprocess.CompletedProcess:
        out, err = cwd.parent / "stdout.txt", cwd.parent / "stderr.txt"
        request = {"cwd": str(cwd), "args": args, "stdout": str(out), "stderr": str(err)}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        reply = self.server.stdout.readline()
        if not reply:
            raise RuntimeError(f"the forking server exited with {self.server.wait()}")
        code = json.loads(reply)["code"]
        return subprocess.CompletedProcess(args, code, out.read_text(), err.read_text())

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=30)


if __name__ == "__main__":
    serve()
