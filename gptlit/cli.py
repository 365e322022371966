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

from jsonargparse import auto_cli
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gptlit.callbacks import AtomicCheckpointIO, GracefulStop, LastCheckpoint, best_checkpoint
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


def _option(args: list[str], name: str) -> str | None:
    """The value of ``--name value`` or ``--name=value`` in args, if given."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _is_rank_zero() -> bool:
    # Under DDP every process parses the command line; only the first may judge or change run directories.
    return (
        int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0
    )


def _add_config_of_latest_run(args: list[str]) -> list[str]:
    """``--ckpt_path last|best`` with no ``--config`` resumes the most recently written run."""
    if _option(args, "--ckpt_path") not in CHECKPOINT_ALIASES or _option(args, "--config") is not None:
        return args
    root = _option(args, "--trainer.default_root_dir") or os.getcwd()
    run = latest_run(root)
    if run is None:
        raise UsageError(
            f"--ckpt_path {_option(args, '--ckpt_path')}: no run to resume under {Path(root) / 'lightning_logs'}; "
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
            check_same_shape(checkpoint, dict(config.model), path)
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
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"use_distributed_sampler": False, "log_every_n_steps": 10},
    )


def prepare_main(args: list[str]) -> None:
    """``python -m gptlit prepare --config X``: only the data preparation of a fit config."""
    cli = make_cli(args, run=False)
    cli.datamodule.prepare_data()


USER_ERRORS = (UsageError, ValueError, FileNotFoundError, MisconfigurationException, NonFiniteLossError)


def cli_main(args: list[str] | None = None) -> None:
    """Entry point of ``python -m gptlit`` and the ``gptlit`` script; ``args`` defaults to ``sys.argv[1:]``."""
    args = list(sys.argv[1:] if args is None else args)
    # gptlit passes the command line on explicitly (it may add the resumed run's config).
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
    try:
        if args and args[0] == "prepare":
            prepare_main(args[1:])
        elif args and args[0] in FUNCTION_SUBCOMMANDS:
            auto_cli(FUNCTION_SUBCOMMANDS[args[0]], args=args[1:], as_positional=False)
        elif args and args[0] in LIGHTNING_SUBCOMMANDS:
            make_cli(_add_config_of_latest_run(args))
        else:
            make_cli(args)
    except SIGTERMException:
        print("gptlit: stopped; resume with `python -m gptlit fit --ckpt_path last`", file=sys.stderr)
        raise SystemExit(130) from None
    except USER_ERRORS as err:
        if os.environ.get("GPTLIT_DEBUG"):
            raise
        message = " ".join(str(err).split())  # one line
        print(f"gptlit: error: {message}", file=sys.stderr)
        raise SystemExit(1) from None
