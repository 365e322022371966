"""What the command line tells a newcomer: the list of commands, and where a run is and what to run next."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from gptlit.training.runs import LOGS_DIR, shown

# Every command, in the order a run meets them; `python -m gptlit --help` lists them.
COMMANDS = {
    "fit": "train a model (a new run, or --ckpt_path last to resume one)",
    "validate": "the validation loss of a checkpoint (--ckpt_path best)",
    "test": "the same on the test split (TinyStories has none of its own: the validation stories)",
    "prepare": "only prepare the data of a config: download, train the tokenizer, write the token files",
    "sample": "write stories with a trained model (--prompt, --num_samples, --interactive true)",
    "export": "write a checkpoint as a Hugging Face transformers directory (--out_dir)",
    "tune": "search hyperparameters with Optuna: fits of a config with values from --search, scored by val bpb",
}
# Commands LightningCLI would offer that gptlit does not, and what to run instead.
NOT_COMMANDS = {
    "predict": "gptlit's model has no predict step; write stories from a checkpoint with "
    "`python -m gptlit sample --ckpt_path best --prompt ...`",
}

CKPT_PATH_HELP = (
    "Resume (fit) or evaluate (validate, test) a checkpoint: last (the run's newest state), best (its lowest "
    "val/loss), or a .ckpt file. last and best are of the run --run_name names (default: the config's file name, "
    "without --config the most recently written run). A run resumes from its own saved config.yaml; options "
    "typed on the command line change it, --config only names the run."
)


def program() -> str:
    """How the user called gptlit: ``gptlit`` (the script) or ``python -m gptlit``."""
    return "gptlit" if Path(sys.argv[0]).name == "gptlit" else "python -m gptlit"


def overview() -> str:
    """The text of ``python -m gptlit --help``: each command with a line."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "\n".join(
        [
            f"usage: {program()} <command> [options]",
            "",
            "Train a small GPT on TinyStories, then write stories with it.",
            "",
            "commands:",
            *lines,
            "",
            f"Options of a command: {program()} <command> --help (for example {program()} fit --help).",
        ]
    )


def where_lines(run: Path, started: bool, extend_with: list[str] | None = None) -> list[str]:
    """Where run ``run`` lives and the commands to watch, resume, sample and export it (at most 5 lines).

    ``started``: at the start of ``fit`` (the checkpoint directory and how to watch and resume), else at its
    end (the checkpoints saved, and what to run next). ``extend_with``: a run that reached its end resumes only
    with a longer budget or more steps; the resume command then gives these options (``--trainer.max_time ...``).
    """
    root = run.parent.parent
    in_root = [] if os.path.abspath(root) == os.getcwd() else ["--root_dir", shown(root)]
    name = ["--run_name", run.name]
    lines = [f"  watch:  tensorboard --logdir {shlex.quote(shown(root / LOGS_DIR))}"]
    if extend_with is None:
        lines.append(f"  resume: {resume_command(run)}")
    else:  # a wsd run extends from the state before its decay
        stable = (run / "checkpoints" / "stable.ckpt").is_file()
        lines.append(f"  extend: {resume_command(run, 'stable' if stable else 'last', extend_with)}")
    if started:
        return [f"gptlit: run '{run.name}' in {shown(run)}, checkpoints in {shown(run / 'checkpoints')}", *lines]
    saved = sorted((run / "checkpoints").glob("*.ckpt"))
    which = "best" if run / "checkpoints" / "best.ckpt" in saved else "last"
    lines.append(_command("  sample:", "sample", "--ckpt_path", which, *name, *in_root))
    lines.append(_command("  export:", "export", "--ckpt_path", which, *name, *in_root, "--out_dir", f"hf/{run.name}"))
    listed = ", ".join(shown(p) for p in saved) or "none saved"
    return [f"gptlit: run '{run.name}' in {shown(run)}; checkpoints: {listed}", *lines]


def resume_command(run: Path, ckpt_path: str = "last", more: list[str] | tuple[str, ...] = ()) -> str:
    """The command that resumes run ``run`` from the current directory: its name, and its root directory unless
    that is the current one (a resume without ``--config`` reads the run's ``config.yaml`` there)."""
    root = run.parent.parent
    on_root = [] if os.path.abspath(root) == os.getcwd() else ["--trainer.default_root_dir", shown(root)]
    return f"{program()} {shlex.join(['fit', '--ckpt_path', ckpt_path, '--run_name', run.name, *on_root, *more])}"


def _command(label: str, *args: str) -> str:
    return f"{label} {program()} {shlex.join(args)}"
