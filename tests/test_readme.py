"""The README's commands for a new user run as written, in the order the README gives them.

Each ``python -m gptlit`` command of "Quick start", "On a CPU, or without the Hub" and "Watch, resume, prepare"
(fenced or inline) runs in a fresh directory holding a copy of ``configs/`` and a small corpus in the official
TinyStories layout. Only what cannot run in a test is changed, and every change is listed in ``SUBSTITUTIONS``
and ``SMALL``: the data file's name, step counts (which also stand for time budgets), and a small model and
vocabulary.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_corpus

ROOT = Path(__file__).parents[1]
SECTIONS = ("Quick start", "On a CPU, or without the Hub", "Watch, resume, prepare")
# The README's local files stand for the test corpus.
SUBSTITUTIONS = {"path/to/TinyStories-train.txt": "stories.txt", "tinystories-2mib.txt": "stories.txt"}
# Appended to commands that build a model or prepare data: a model that trains in seconds.
SMALL = [
    *("--data.vocab_size", "320", "--data.batch_size", "4", "--data.num_workers", "0"),
    *("--model.config.embed_dim", "32", "--model.config.n_layers", "2", "--model.config.n_heads", "2"),
    *("--model.config.block_size", "32", "--trainer.precision", "32-true", "--trainer.accelerator", "cpu"),
    *("--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2"),
    *("--checkpoint.every_n_train_steps", "4", "--trainer.enable_progress_bar", "false"),
]
FRESH_STEPS = ["--trainer.max_steps", "8"]
EXTENDED_STEPS = 12  # what "--trainer.max_steps <more>" becomes


def readme_commands(text: str) -> list[str]:
    """The ``python -m gptlit`` commands of ``SECTIONS``, fenced or inline, in the README's order."""
    commands, section, fenced, continued = [], None, False, ""
    for line in text.splitlines():
        if line.startswith("#") and not fenced:
            section = line.lstrip("#").strip()
            continue
        if line.startswith("```"):
            fenced = not fenced
            continue
        if section not in SECTIONS:
            continue
        if fenced:
            line = continued + line.split(" # ")[0].strip()
            if line.endswith("\\"):
                continued = line[:-1] + " "
                continue
            continued = ""
            commands += [part.strip() for part in line.split("&&") if part.strip().startswith("python -m gptlit")]
        else:
            commands += re.findall(r"`(python -m gptlit [^`]+)`", line)
    return commands


def runnable(command: str) -> list[str]:
    """The command as this test runs it (see the module's docstring)."""
    for old, new in SUBSTITUTIONS.items():
        command = command.replace(old, new)
    args = shlex.split(command)[3:]
    if args[0] not in ("fit", "prepare") or "--help" in args:
        return args
    if "--trainer.max_steps" in args:
        args[args.index("--trainer.max_steps") + 1] = str(EXTENDED_STEPS)
    elif "--trainer.max_time" in args and "--ckpt_path" in args:  # an extension: its steps stand for its time
        args += ["--trainer.max_steps", str(EXTENDED_STEPS)]
    elif "--ckpt_path" not in args:
        args += FRESH_STEPS
    if not any(a.startswith("--data.source") for a in args) and "--ckpt_path" not in args:
        args += ["--data.source", "stories.txt"]
    return args + SMALL


def test_the_readme_lists_the_commands_a_new_user_meets() -> None:
    commands = readme_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    subcommands = [shlex.split(c)[3] for c in commands]
    assert subcommands[0] == "fit" and {"sample", "prepare"} <= set(subcommands), commands
    extend = ("--trainer.max_steps", "--trainer.max_time")
    assert any("--ckpt_path stable" in c and any(e in c for e in extend) for c in commands), "no extend command"


def test_the_notebook_trains_with_a_readme_command() -> None:
    """The notebook's advice to train first is a command the README gives (and this module runs)."""
    notebook = (ROOT / "notebooks" / "sample.ipynb").read_text(encoding="utf-8")
    readme = set(readme_commands((ROOT / "README.md").read_text(encoding="utf-8")))
    advised = re.findall(r"`(python -m gptlit fit[^`]*)`", notebook)
    assert advised and all(command in readme for command in advised), advised


def test_exports_are_ignored_by_git() -> None:
    patterns = (ROOT / ".gitignore").read_text().split()
    assert "hf/" in patterns


@pytest.mark.slow
def test_the_readme_commands_run_in_order(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    write_corpus(tmp_path / "stories.txt")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for command in readme_commands((ROOT / "README.md").read_text(encoding="utf-8")):
        args = runnable(command)
        done = subprocess.run(
            [sys.executable, "-m", "gptlit", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr, command
    runs = sorted(p.name for p in (tmp_path / "lightning_logs").iterdir() if p.is_dir())
    assert runs == ["small", "tiny"], runs
    last = torch.load(tmp_path / "lightning_logs" / "tiny" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == EXTENDED_STEPS
