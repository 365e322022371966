"""The command line: ``python -m gptlit fit|validate|test|predict|prepare|sample|export``.

``fit`` and friends go through LightningCLI; every run gets a fixed directory
``lightning_logs/<run_name>/`` so that ``--ckpt_path last`` finds it again, with or without ``--config``.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import NoReturn

from jsonargparse import ArgumentParser, auto_cli
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gptlit.callbacks import AtomicCheckpointIO, GracefulStop, LastCheckpoint, SaveRunConfig, best_checkpoint
from gptlit.data import TinyStoriesDataModule
from gptlit.export import export
from gptlit.module import GPTLitModule, NonFiniteLossError
from gptlit.runs import (
    CHECKPOINT_ALIASES,
    UsageError,
    check_same_shape,
    latest_run,
    load_checkpoint,
    resolve_checkpoint,
    run_dir,
)
from gptlit.sample import sample

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
FUNCTION_SUBCOMMANDS = {"sample": sample, "export": export}
SUBCOMMANDS = (*LIGHTNING_SUBCOMMANDS, "prepare", *FUNCTION_SUBCOMMANDS)


def _option(args: list[str], name: str) -> str | None:
    """The value of ``--name value`` or ``--name=value`` in args, if given."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _is_rank_zero() -> bool:
    """Whether this is the first process of a run, judged from the environment before Lightning has started.

    Under DDP every process parses the command line; only the first may judge or change run directories.
    torchrun sets RANK; Lightning's own launcher sets LOCAL_RANK (and NODE_RANK) for the processes it starts;
    SLURM's srun starts every task itself and sets SLURM_PROCID. Same order as Lightning's ``rank_zero_only``.
    """
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key]) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0
    return True


class ConfigError(UsageError):
    """A command line or config file the parser rejects (unknown key, wrong type, missing file)."""


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
    """The parser of ``fit``, ``validate``, ``test``, ``predict`` and ``prepare``."""


class FunctionArgumentParser(OneLineErrors, ArgumentParser):
    """The parser of ``sample`` and ``export``."""


def _add_config_of_run(args: list[str]) -> list[str]:
    """``--ckpt_path`` with no ``--config`` resumes with the config of the checkpoint's run.

    ``last``/``best`` name the most recently written run; a file in ``<run>/checkpoints/`` names its run.
    """
    ckpt_path = _option(args, "--ckpt_path")
    if ckpt_path is None or _option(args, "--config") is not None:
        return args
    if ckpt_path not in CHECKPOINT_ALIASES:
        config = Path(ckpt_path).parent.parent / "config.yaml"
        in_run = Path(ckpt_path).parent.name == "checkpoints" and config.is_file()
        return [args[0], "--config", str(config), *args[1:]] if in_run else args
    root = _option(args, "--trainer.default_root_dir") or os.getcwd()
    run = latest_run(root)
    if run is None:
        raise UsageError(
            f"--ckpt_path {ckpt_path}: no run to resume under {Path(root) / 'lightning_logs'}; "
            "start one with `python -m gptlit fit --config configs/tiny.yaml`"
        )
    return [args[0], "--config", str(run / "config.yaml"), *args[1:]]


class GPTLitCLI(LightningCLI):
    """LightningCLI with gptlit's links, checkpoints and run directories."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_name", type=str | None, default=None, help="Run directory name (default: config stem)"
        )
        parser.add_argument("--overwrite", type=bool, default=False, help="Replace an existing run of this name")
        parser.add_lightning_class_args(LastCheckpoint, "checkpoint")
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.link_arguments("model.block_size", "data.block_size")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI (since 2.5) replaces the model settings with those saved in a --ckpt_path file (not 'last' or
        # 'best'), loading it before gptlit's checks: `--model.embed_dim 64` would be silently ignored, and a
        # file that is not a plain checkpoint would end in a traceback. gptlit keeps the config it is given (the
        # checkpoint's run's own when there is no --config) and checks the checkpoint against it below.
        pass

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
        if ckpt_path is not None:
            path = resolve_checkpoint(ckpt_path, self.run_dir)
            checkpoint = load_checkpoint(path)
            check_same_shape(checkpoint, dict(config.model), path, data_vocab_size=config.data.vocab_size)
            self.resume_step = checkpoint.get("global_step", 0)
            config.ckpt_path = str(path)
            if config.get("weights_only") is None:
                config.weights_only = True  # Lightning's own load: tensors and plain types only, no code
        elif self.subcommand == "fit" and _is_rank_zero() and (self.run_dir / "config.yaml").exists():
            if not config.overwrite:
                raise UsageError(
                    f"run '{config.run_name}' already exists in {self.run_dir}; resume it with --ckpt_path last, "
                    "choose another --run_name, or pass --overwrite true to replace it"
                )
            shutil.rmtree(self.run_dir)
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
        trainer = super().instantiate_trainer(**kwargs)
        extra = [best_checkpoint(), GracefulStop()]
        if config.trainer.enable_progress_bar is not False and not any(
            isinstance(cb, RichProgressBar) for cb in trainer.callbacks
        ):
            extra.append(RichProgressBar())
        for callback in extra:
            trainer.callbacks.append(callback)
        return trainer


def make_cli(args: list[str], run: bool = True) -> GPTLitCLI:
    return GPTLitCLI(
        GPTLitModule,
        TinyStoriesDataModule,
        args=args,
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


USER_ERRORS = (UsageError, ValueError, FileNotFoundError, MisconfigurationException, NonFiniteLossError)


def _command(args: list[str]) -> str:
    """How the user called gptlit, for hints: ``python -m gptlit fit`` or ``gptlit fit``."""
    program = "gptlit" if Path(sys.argv[0]).name == "gptlit" else "python -m gptlit"
    subcommand = args[0] if args and args[0] in SUBCOMMANDS else ""
    return f"{program} {subcommand}".strip()


def _fail(message: str, code: int = 1) -> NoReturn:
    print(f"gptlit: error: {' '.join(message.split())}", file=sys.stderr)  # one line
    raise SystemExit(code)


def cli_main(args: list[str] | None = None) -> None:
    """Entry point of ``python -m gptlit`` and the ``gptlit`` script; ``args`` defaults to ``sys.argv[1:]``."""
    args = list(sys.argv[1:] if args is None else args)
    # gptlit passes the command line on explicitly (it may add the resumed run's config).
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
    try:
        if args and args[0] == "prepare":
            prepare_main(args[1:])
        elif args and args[0] in FUNCTION_SUBCOMMANDS:
            auto_cli(
                FUNCTION_SUBCOMMANDS[args[0]], args=args[1:], as_positional=False, parser_class=FunctionArgumentParser
            )
        elif args and args[0] in LIGHTNING_SUBCOMMANDS:
            make_cli(_add_config_of_run(args))
        elif args and not args[0].startswith("-"):
            raise ConfigError(f"unknown command '{args[0]}'; choose one of {', '.join(SUBCOMMANDS)}")
        else:
            make_cli(args)
    except SIGTERMException:
        print("gptlit: stopped; resume with `python -m gptlit fit --ckpt_path last`", file=sys.stderr)
        raise SystemExit(130) from None
    except ConfigError as err:
        _fail(f"{err}; see `{_command(args)} --help` for the options", code=2)
    except USER_ERRORS as err:
        if os.environ.get("GPTLIT_DEBUG"):
            raise
        _fail(str(err))
    except OSError as err:  # a full disk, a read-only or missing directory: the environment, not gptlit
        if os.environ.get("GPTLIT_DEBUG"):
            raise
        where = f": {err.filename}" if err.filename else ""
        _fail(f"{err.strerror or err}{where}; check that the path exists, is writable and has free space")
