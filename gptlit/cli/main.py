"""The command line: ``python -m gptlit fit|validate|test|prepare|sample|export|tune`` (``--help`` lists them).

``fit`` and friends go through LightningCLI; every run gets a fixed directory
``lightning_logs/<run_name>/`` so that ``--ckpt_path last`` finds it again, with or without ``--config``.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from pathlib import Path
from typing import NoReturn

from jsonargparse import ArgumentParser, auto_cli
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelSummary, ProgressBar, ThroughputMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gptlit.checkpoint import check_same_shape, read_checkpoint
from gptlit.cli.help import CKPT_PATH_HELP, NOT_COMMANDS, overview, program, resume_command, where_lines
from gptlit.cli.precision import GPTLitTrainer
from gptlit.cli.reporting import (
    ENVIRONMENT_ERRNOS,
    environment_failure,
    fail,
    nearest_existing,
    quiet_thread_errors,
    silence_other_libraries,
)
from gptlit.cli.run_config import (
    SaveRunConfig,
    announce_saved_config,
    command_options,
    config_of_resumed_run,
    is_rank_zero,
    migrated_config_args,
)
from gptlit.cli.sample import sample
from gptlit.data.datamodule import TextDataModule
from gptlit.errors import ConfigError, GptlitError, UsageError
from gptlit.export.command import export
from gptlit.generation.decoding import SAMPLING_RANGES, sampling_option_error
from gptlit.locks import DirectoryLock, lock_directory
from gptlit.training.budget_callback import TimeBudget, clock
from gptlit.training.checkpoint_callbacks import AtomicCheckpointIO, BestCheckpoint, LastCheckpoint, StableCheckpoint
from gptlit.training.lightning_private import KeepConfigOverCheckpoint
from gptlit.training.module import GPTLitModule
from gptlit.training.progress import ParameterSummary, StepProgressBar
from gptlit.training.runs import (
    CHECKPOINT_ALIASES,
    LOGS_DIR,
    check_decay_not_begun,
    check_same_optimizer,
    has_checkpoint,
    latest_run,
    named_run,
    resolve_checkpoint,
    run_dir,
    set_aside,
    shown,
)
from gptlit.training.stopping import GracefulStop, ValidateAtEnd
from gptlit.tune.command import tune

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")  # not predict: see gptlit.cli.help.NOT_COMMANDS
FUNCTION_SUBCOMMANDS = {"sample": sample, "export": export}
SUBCOMMANDS = (*LIGHTNING_SUBCOMMANDS, "prepare", *FUNCTION_SUBCOMMANDS, "tune")
# Tokens per second and learning rates are averaged over this many batches by ThroughputMonitor.
THROUGHPUT_WINDOW = 10


class OneLineErrors:
    """A parser mixin: report a parse error in one line instead of argparse's usage (a hundred lines for fit).

    Only where the parser would exit (``exit_on_error``); jsonargparse's inner parsers raise and recover as
    before. ``GPTLIT_DEBUG=1`` keeps the full usage.
    """

    exit_on_error: bool

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("GPTLIT_DEBUG"):
            super().error(message, ex)  # type: ignore[misc]
        raise ConfigError(" ".join(message.split()))


class GPTLitArgumentParser(OneLineErrors, LightningArgumentParser):
    """The parser of ``fit``, ``validate``, ``test`` and ``prepare``."""

    def add_method_arguments(self, *args, **kwargs) -> list[str]:
        """The Trainer method's arguments, ``--ckpt_path`` with the help of what gptlit accepts there."""
        added = super().add_method_arguments(*args, **kwargs)
        for action in self._actions:
            if action.dest == "ckpt_path":
                action.help = CKPT_PATH_HELP
        return added


class FunctionArgumentParser(OneLineErrors, ArgumentParser):
    """The parser of ``sample`` and ``export``: a sampling option that is not even of its type (``nan``, ``inf``,
    ``1.5`` for an integer) gets the same error as one outside its range."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        found = re.search(r'Parser key "(\w+)".*?(?:Got|Given) value: (\S+)', " ".join(message.split()))
        if self.exit_on_error and found and found[1] in SAMPLING_RANGES and not os.environ.get("GPTLIT_DEBUG"):
            raise sampling_option_error(found[1], found[2])
        super().error(message, ex)


def _add_config_of_run(args: list[str]) -> list[str]:
    """``--ckpt_path`` resumes the checkpoint's run, with that run's saved config and name (with ``--config``:
    `gptlit.cli.run_config.config_of_resumed_run`).

    ``last``/``best`` name the run ``--run_name`` gives, else the most recently written one; a file in
    ``<root>/lightning_logs/<run>/checkpoints/`` names its run (also one copied or renamed since).
    """
    options = command_options(args[1:])
    if options.config:
        return config_of_resumed_run(args)
    if options.ckpt_path is None:
        return args
    if options.ckpt_path not in CHECKPOINT_ALIASES:
        path = Path(options.ckpt_path)
        run = path.parent.parent
        if path.parent.name != "checkpoints" or not (run / "config.yaml").is_file():
            return args
        where = ["--trainer.default_root_dir", str(run.parent.parent)] if run.parent.name == LOGS_DIR else []
        announce_saved_config(run, args[1:])
        return [args[0], "--config", str(run / "config.yaml"), "--run_name", run.name, *where, *args[1:]]
    root = options.root_dir or os.getcwd()
    run = named_run(root, options.run_name) if options.run_name else latest_run(root)
    if run is None or not (run / "config.yaml").is_file():
        raise UsageError(
            f"--ckpt_path {options.ckpt_path}: no run to resume in {run or Path(root) / LOGS_DIR}; "
            "start one with `python -m gptlit fit --config configs/tiny.yaml`"
        )
    announce_saved_config(run, args[1:])
    return [args[0], "--config", str(run / "config.yaml"), "--run_name", run.name, *args[1:]]


class RunStopped(SIGTERMException):
    """A ``fit`` stopped between two batches (SIGTERM, or Ctrl-C) with ``last.ckpt`` saved.

    Args:
        step: The optimizer step ``last.ckpt`` holds.
        resume: The command that resumes the run, run from the directory it was started in.
    """

    def __init__(self, step: int, resume: str) -> None:
        super().__init__(130)
        self.step, self.resume = step, resume


class GPTLitCLI(KeepConfigOverCheckpoint, LightningCLI):
    """LightningCLI with gptlit's links, checkpoints and run directories."""

    run_lock: DirectoryLock | None = None  # fit holds its run directory while it runs (rank 0)

    def __init__(self, *args, **kwargs) -> None:
        try:
            super().__init__(*args, **kwargs)
        finally:
            if self.run_lock is not None:
                self.run_lock.release()

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in LIGHTNING_SUBCOMMANDS}

    def before_fit(self) -> None:
        """Say where the run is, and how to watch and resume it."""
        if is_rank_zero():
            print("\n".join(where_lines(self.run_dir, started=True)), file=sys.stderr)

    def after_fit(self) -> None:
        """Say where the run's checkpoints are, and what to run next."""
        trainer = self.trainer
        extend_with = None
        if 0 < trainer.max_steps <= trainer.global_step:  # finished: it goes on with twice its budget or steps
            budget = next((c.plan for c in trainer.callbacks if isinstance(c, TimeBudget) and c.plan), None)
            twice = ["--trainer.max_time", clock(2 * budget.budget_s)] if budget else []
            extend_with = twice or ["--trainer.max_steps", str(2 * trainer.max_steps)]
        if is_rank_zero():
            print("\n".join(where_lines(self.run_dir, started=False, extend_with=extend_with)), file=sys.stderr)

    def fit(self, **kwargs) -> None:
        """``trainer.fit``: LightningCLI runs a method of the CLI named after the subcommand in its place."""
        try:
            self.trainer.fit(**kwargs)
        except SIGTERMException as stop:
            raise RunStopped(self.trainer.global_step, resume_command(self.run_dir)) from stop

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_name", type=str | None, default=None, help="Run directory name (default: config stem)"
        )
        parser.add_argument("--overwrite", type=bool, default=False, help="Replace an existing run of this name")
        parser.add_lightning_class_args(LastCheckpoint, "checkpoint")
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")
        parser.link_arguments("model.config.block_size", "data.block_size")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if not config.run_name:
            config_files = config.get("config") or []
            config.run_name = Path(str(config_files[0])).stem if config_files else "default"
        self.run_root = config.trainer.default_root_dir or os.getcwd()
        self.run_dir = run_dir(self.run_root, config.run_name)
        self.resume_step = 0
        if self.subcommand is None:
            return
        ckpt_path = config.get("ckpt_path")
        path = None if ckpt_path is None else resolve_checkpoint(ckpt_path, self.run_dir)  # reads, changes nothing
        if self.subcommand == "fit" and is_rank_zero():  # before anything in the run directory changes
            _check_writable(self.run_dir)
            advice = "let it finish (sample, export and validate can read the run meanwhile), or use another --run_name"
            self.run_lock = lock_directory(self.run_dir, advice=advice)
        if path is not None:
            checkpoint = read_checkpoint(path, optimizer=self.subcommand == "fit")  # resumed: its optimizer too
            check_same_shape(checkpoint, dict(config.model.config), path, data_vocab_size=config.data.vocab_size)
            if self.subcommand == "fit":
                check_same_optimizer(checkpoint, config.model.optimizer, path)
                check_decay_not_begun(checkpoint, config.model.schedule, config.trainer.max_steps, path, ckpt_path)
            self.resume_step = checkpoint.get("global_step", 0)
            config.ckpt_path = str(path)
            if config.get("weights_only") is None:
                config.weights_only = True  # Lightning's own load: tensors and plain types only, no code
        elif self.subcommand == "fit" and is_rank_zero() and (self.run_dir / "config.yaml").exists():
            _make_room(self.run_dir, config.overwrite, self.run_lock)
        config.overwrite = False  # never saved into the run's config.yaml: a resume must not wipe the run

    def instantiate_trainer(self, **kwargs):
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.logger in (None, True):
            kwargs["logger"] = TensorBoardLogger(
                save_dir=self.run_root,
                name="lightning_logs",
                version=config.run_name,
                default_hp_metric=False,
                # After a kill, drop events logged past the checkpoint so the curve stays one line.
                purge_step=self.resume_step or None,
            )
        if not config.trainer.plugins:
            kwargs["plugins"] = [AtomicCheckpointIO()]
        given = (self.config_init[self.subcommand] if self.subcommand else self.config_init).trainer.callbacks
        given = [] if given is None else given if isinstance(given, list) else [given]
        # Before the Trainer is built: with a ModelCheckpoint among them, Lightning adds no checkpoint of its own.
        kwargs["callbacks"] = [*given, *_default_callbacks(given, config.trainer)]
        if any(isinstance(cb, ParameterSummary) for cb in kwargs["callbacks"]):
            kwargs["enable_model_summary"] = False  # Lightning's own would only say that gptlit's is there
        try:
            return super().instantiate_trainer(**kwargs)
        except (ValueError, MisconfigurationException) as err:  # the Trainer refuses its settings
            raise ConfigError(f"trainer: {err}") from err


def _sequences(batch) -> int:
    return batch[0].size(0)  # x: (B, T)


def _tokens(batch) -> int:
    return batch[0].numel()


def _default_callbacks(present: list, trainer) -> list:
    """The callbacks every run has, unless the config brings its own of the kind (or turns it off)."""
    defaults = [
        BestCheckpoint(),
        StableCheckpoint(),
        GracefulStop(),
        TimeBudget(),  # plans the schedule over trainer.max_time, when given
        ValidateAtEnd(),
        LearningRateMonitor(logging_interval="step"),  # train/lr/<parameter group>
        # train/device/items_per_sec: tokens per second per process; train/device/mfu on GPUs Lightning knows.
        ThroughputMonitor(batch_size_fn=_sequences, length_fn=_tokens, window_size=THROUGHPUT_WINDOW),
    ]
    if trainer.enable_progress_bar is not False and not any(isinstance(cb, ProgressBar) for cb in present):
        defaults.append(StepProgressBar())
    if trainer.enable_model_summary is not False and not any(isinstance(cb, ModelSummary) for cb in present):
        defaults.append(ParameterSummary())
    return [cb for cb in defaults if not any(isinstance(other, type(cb)) for other in present)]


def _make_room(run: Path, overwrite: bool, lock: DirectoryLock) -> None:
    """A fresh ``fit`` where a run of its name exists: with ``--overwrite true`` the run is replaced; a run that
    saved no checkpoint (killed before its first) starts over, its earlier logs moved aside; any other is refused.
    """
    if overwrite:
        lock.clear()  # everything but the lock this process holds
    elif not has_checkpoint(run):
        aside = set_aside(run)
        note = f"gptlit: run '{run.name}' saved no checkpoint: starting it over; its logs moved to {shown(aside)}"
        print(note, file=sys.stderr)
    else:
        raise UsageError(
            f"run '{run.name}' already exists in {run}; resume it with --ckpt_path last, "
            "choose another --run_name, or pass --overwrite true to replace it"
        )


def _check_writable(directory: Path) -> None:
    """Refuse a run directory that cannot be created, before anything is prepared or trained (and leave no trace)."""
    existing = nearest_existing(directory)
    why = "" if existing.is_dir() else "is not a directory"
    if not why and not os.access(existing, os.W_OK | os.X_OK):
        why = "is not writable"
    if why:
        raise UsageError(
            f"cannot create the run directory {directory}: {existing} {why}; choose another --trainer.default_root_dir"
        )


def make_cli(args: list[str], run: bool = True) -> GPTLitCLI:
    return GPTLitCLI(
        GPTLitModule,
        TextDataModule,
        trainer_class=GPTLitTrainer,  # trainer.precision: auto
        args=migrated_config_args(args),
        run=run,
        parser_class=GPTLitArgumentParser,
        auto_configure_optimizers=False,
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"use_distributed_sampler": False, "log_every_n_steps": 10},
    )


def prepare_main(args: list[str]) -> None:
    """``python -m gptlit prepare --config X``: only the data preparation of a fit config."""
    cli = make_cli(args, run=False)
    cli.datamodule.prepare_data()


def _command(args: list[str]) -> str:
    """How the user called gptlit, for hints: ``python -m gptlit fit`` or ``gptlit fit``."""
    subcommand = args[0] if args and args[0] in SUBCOMMANDS else ""
    return f"{program()} {subcommand}".strip()


def _run(args: list[str]) -> None:
    if not args or args[0] in ("-h", "--help"):
        print(overview())
    elif args[0] == "prepare":
        prepare_main(args[1:])
    elif args[0] == "tune":
        tune(args[1:])  # its trials are fits, each in a process of its own
    elif args and args[0] in FUNCTION_SUBCOMMANDS:
        auto_cli(FUNCTION_SUBCOMMANDS[args[0]], args=args[1:], as_positional=False, parser_class=FunctionArgumentParser)
    elif args and args[0] in LIGHTNING_SUBCOMMANDS:
        make_cli(_add_config_of_run(args))
    elif args[0] in NOT_COMMANDS:
        raise ConfigError(f"'{args[0]}' is not a gptlit command: {NOT_COMMANDS[args[0]]}")
    elif not args[0].startswith("-"):
        raise ConfigError(f"unknown command '{args[0]}'; choose one of {', '.join(SUBCOMMANDS)}")
    else:
        make_cli(args)


def cli_main(args: list[str] | None = None) -> None:
    """Entry point of ``python -m gptlit`` and the ``gptlit`` script; ``args`` defaults to ``sys.argv[1:]``.

    gptlit's own errors (`gptlit.errors`), the parser's and Lightning's configuration errors end in one
    ``gptlit: error:`` line; anything else is a bug and keeps its traceback. ``GPTLIT_DEBUG=1`` shows the
    traceback of every error.
    """
    args = list(sys.argv[1:] if args is None else args)
    silence_other_libraries()
    debug = bool(os.environ.get("GPTLIT_DEBUG"))
    if not debug:
        threading.excepthook = quiet_thread_errors
    try:
        _run(args)
    except RunStopped as stop:
        if is_rank_zero():
            resume = f"resume with `{stop.resume}`"
            print(f"gptlit: stopped at step {stop.step}, saved in last.ckpt; {resume}", file=sys.stderr)
        raise SystemExit(130) from None
    except SIGTERMException:  # validate, test or predict: nothing to resume
        if is_rank_zero():
            print("gptlit: stopped by SIGTERM", file=sys.stderr)
        raise SystemExit(130) from None
    except ConfigError as err:
        if debug:
            raise
        fail(f"{err}; see `{_command(args)} --help` for the options", code=2)
    except (GptlitError, MisconfigurationException) as err:
        if debug:
            raise
        fail(str(err))
    except OSError as err:  # a full disk, a read-only directory: the machine, not gptlit
        if debug or err.errno not in ENVIRONMENT_ERRNOS:
            raise
        fail(environment_failure(err))
    finally:
        threading.excepthook = threading.__excepthook__
