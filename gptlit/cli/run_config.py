"""A run's ``config.yaml``: written when training starts, and read back, migrated, to resume the run.

Config files of earlier gptlit versions keep working: before the parser reads a config file, keys that have
moved are moved (``migrate_config``) in a copy, and the file itself is left as it is.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.cli import SaveConfigCallback

from gptlit.checkpoint import nest_model_config
from gptlit.model.config import GPTConfig
from gptlit.moved import new_class_path
from gptlit.training.runs import CHECKPOINT_ALIASES, run_dir, shown

GPT_FIELDS = {f.name for f in dataclasses.fields(GPTConfig)}

# Options of LastCheckpoint's 0.1.0 form (a ModelCheckpoint), which had no effect on last.ckpt.
_OLD_CHECKPOINT_KEYS = (
    "filename",
    "monitor",
    "verbose",
    "save_on_exception",
    "save_weights_only",
    "mode",
    "auto_insert_metric_name",
    "train_time_interval",
    "every_n_epochs",
    "save_on_train_epoch_end",
    "enable_version_counter",
)


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
        staging = path.with_name(f".{path.name}.partial")
        self.parser.save(self.config, str(staging), skip_unset=False, overwrite=True, multifile=self.multifile)
        os.replace(staging, path)


def command_options(args: list[str]) -> argparse.Namespace:
    """The options gptlit reads before LightningCLI does: ``config`` (a list: ``-c X``, ``--config X`` or
    ``--config=X``, each as often as given), ``ckpt_path``, ``run_name`` and ``root_dir``
    (``--trainer.default_root_dir``)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("-c", "--config", action="append", default=[])
    parser.add_argument("--ckpt_path")
    parser.add_argument("--run_name")
    parser.add_argument("--trainer.default_root_dir", dest="root_dir")
    known, _ = parser.parse_known_args(args)
    return known


def config_of_resumed_run(args: list[str]) -> list[str]:
    """``fit --config X --ckpt_path last``: the run's saved ``config.yaml`` in place of ``X``.

    ``X`` only names the run (``run_name`` in it, else its file name; ``--run_name`` first), as it did when the
    run started: what the run was started with (a local ``data.source`` given on the command line, say) comes
    from its own ``config.yaml``, and only what is typed after it (``--trainer.max_steps 2000``, further
    ``--config`` files) changes that. Unchanged when the run has no ``config.yaml``, when ``X`` is itself a
    run's ``config.yaml``, or when ``--ckpt_path`` is a file outside the run's ``checkpoints/`` (a new run
    started from another's weights). ``args[0]`` is the subcommand.
    """
    options = command_options(args[1:])
    if options.ckpt_path is None or not options.config:
        return args
    given = Path(options.config[0])
    if given.name == "config.yaml" and (given.parent / "checkpoints").is_dir():
        return args
    settings = _read_yaml(given)
    trainer = settings.get("trainer") if isinstance(settings.get("trainer"), dict) else {}
    name = options.run_name or settings.get("run_name") or given.stem
    run = run_dir(options.root_dir or trainer.get("default_root_dir") or os.getcwd(), str(name))
    in_run = Path(options.ckpt_path).resolve().parent == (run / "checkpoints").resolve()
    if not (run / "config.yaml").is_file() or not (options.ckpt_path in CHECKPOINT_ALIASES or in_run):
        return args
    rest = _without_first_config(args[1:])
    announce_saved_config(run, rest, instead_of=str(given))
    return [args[0], "--config", str(run / "config.yaml"), "--run_name", run.name, *rest]


def announce_saved_config(run: Path, args: list[str], instead_of: str | None = None) -> None:
    """Say, in one line, that ``run``'s saved ``config.yaml`` is used, and which options ``args`` change."""
    if not is_rank_zero():
        return
    changed = []
    for i, arg in enumerate(args):
        name, _, value = arg.partition("=")
        if name in ("-c", "--config"):  # a config file on top: named as given
            changed.append(value or (args[i + 1] if i + 1 < len(args) else ""))
        elif arg.startswith("--") and name not in _NAMING_OPTIONS:
            changed.append(name[2:].rstrip("+"))  # --trainer.callbacks+=... appends
    note = f" ({instead_of} names the run; its settings are not read)" if instead_of else ""
    what = f"changed on the command line: {', '.join(changed)}" if changed else "nothing changed on the command line"
    print(f"gptlit: run '{run.name}' uses its saved {shown(run / 'config.yaml')}{note}; {what}", file=sys.stderr)


# Options that name the run to resume, not settings of it.
_NAMING_OPTIONS = ("--ckpt_path", "--run_name")


def _without_first_config(args: list[str]) -> list[str]:
    for i, arg in enumerate(args):
        if arg in ("-c", "--config"):
            return args[:i] + args[i + 2 :]
        if arg.startswith("--config="):
            return args[:i] + args[i + 1 :]
    return args


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}  # the parser reports it
    return settings if isinstance(settings, dict) else {}


def migrate_config(config: dict[str, Any]) -> list[str]:
    """Move the keys of an earlier gptlit's config to where this gptlit reads them (in place).

    Returns a line for each change the user should know of (a dropped ``null`` goes unsaid). Only the
    sections of a ``fit`` config (``model``, ``data``, ``trainer``, ``checkpoint``) are touched.
    """
    notes = []
    checkpoint = config.get("checkpoint")
    if isinstance(checkpoint, dict):
        dropped = [key for key in _OLD_CHECKPOINT_KEYS if key in checkpoint]
        for key in dropped:
            del checkpoint[key]
        if dropped:
            notes.append(f"checkpoint.{{{','.join(dropped)}}} dropped: last.ckpt takes every_n_train_steps and dirpath")
    model = config.get("model")
    if isinstance(model, dict):
        if model.get("peak_flops") is not None:
            notes.append("model.peak_flops is gone: train/device/mfu comes from Lightning's ThroughputMonitor")
        moved = sorted(k for k in model if k in GPT_FIELDS)
        config["model"] = nest_model_config(model)
        if moved:
            notes.append(f"model.{{{','.join(moved)}}} read as model.config.* (where gptlit reads them since 0.2)")
    _move_class_paths(config)  # silently: gptlit.callbacks.TextSamples is gptlit.training.TextSamples
    return notes


def _move_class_paths(node: Any) -> None:
    """Every ``class_path`` under ``node`` (a config's dicts and lists) at its module's place in this gptlit."""
    if isinstance(node, dict):
        if isinstance(node.get("class_path"), str):
            node["class_path"] = new_class_path(node["class_path"])
        for value in node.values():
            _move_class_paths(value)
    elif isinstance(node, list):
        for value in node:
            _move_class_paths(value)


def migrated_option(arg: str) -> str:
    """A command-line option of gptlit 0.1.0 as this gptlit spells it: ``--model.embed_dim`` is now
    ``--model.config.embed_dim``."""
    name = arg.split("=", 1)[0]
    if name.startswith("--model.") and name[len("--model.") :] in GPT_FIELDS:
        return "--model.config." + arg[len("--model.") :]
    return arg


def migrated_config_args(args: list[str]) -> list[str]:
    """``args`` with every config file that needs migrating replaced by a migrated copy of the same name, and
    options of gptlit 0.1.0 spelled as this gptlit reads them.

    A copy keeps the file's name, since a run is named after its first config file.
    """
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg.split("=", 1)[0] == "--model.peak_flops":  # gone: ThroughputMonitor measures MFU
            i += 1 if "=" in arg else 2
            continue
        if arg in ("-c", "--config") and i + 1 < len(args):
            out += [arg, _migrated_file(args[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + _migrated_file(arg.split("=", 1)[1])
        out.append(migrated_option(arg))
        i += 1
    return out


def _migrated_file(path: str) -> str:
    config = _read_yaml(Path(path))
    if not config:
        return path
    before = copy.deepcopy(config)
    notes = migrate_config(config)
    if config == before:
        return path
    if is_rank_zero():
        for note in notes:
            print(f"gptlit: {path}: {note}", file=sys.stderr)
    directory = tempfile.mkdtemp(prefix="gptlit-config-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    migrated = Path(directory) / Path(path).name
    migrated.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return str(migrated)


def is_rank_zero() -> bool:
    """Whether this is the first process of a run, judged from the environment before Lightning has started.

    Under DDP every process parses the command line; only the first may judge or change run directories.
    torchrun sets RANK; Lightning's own launcher sets LOCAL_RANK (and NODE_RANK) for the processes it starts;
    SLURM's srun starts every task itself and sets SLURM_PROCID. Same order as Lightning's ``rank_zero_only``.
    """
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key]) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0
    return True
