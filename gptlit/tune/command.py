"""``python -m gptlit tune``: a hyperparameter search with Optuna, each trial a ``fit`` of the config.

    python -m gptlit tune --config configs/tiny.yaml --search configs/search/tiny.yaml --trials 20 \
        --trainer.max_time 00:00:05:00 --data.source path/to/TinyStories-train.txt

Every option that is not tune's own is a ``fit`` option, given to every trial. A trial draws its values from the
search file (`gptlit.tune.space`), trains in a process of its own (`gptlit.tune.trials`) as
``<root>/lightning_logs/<study>/lightning_logs/trial-NNN``, and is scored by the bits per byte of its last
checkpoint on the validation split's first ``--score_tokens`` tokens (`gptlit.training.scoring`). The study lives
in Optuna's storage (`gptlit.tune.study`): by default ``<root>/lightning_logs/<study>/study.db``. Optuna is
imported only here, when tune runs: ``fit`` and the rest never need it.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml

from gptlit.checkpoint import read_checkpoint
from gptlit.errors import ConfigError, GptlitError, UsageError
from gptlit.training.runs import shown
from gptlit.training.scoring import checkpoint_bpb
from gptlit.tune.space import Param, fit_args, read_search
from gptlit.tune.study import (
    ERROR,
    STEPS,
    STUDY_FILE,
    SURPLUS,
    WORKER,
    counts,
    log_hparams,
    mark_lost_trials,
    open_storage,
    shown_value,
    table,
    worker,
    write_best,
)
from gptlit.tune.trials import TrialFiles, fit_command, run_fit

STOPPED_CODE = 130  # fit's exit code when Ctrl-C or SIGTERM stopped it (last.ckpt saved)
INSTALL = 'pip install -e ".[tune]" (or pip install "gptlit[tune]")'


class TuneArgumentParser(argparse.ArgumentParser):
    """tune's own options; a mistake in them is one line, like every gptlit error."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


class TrialFailed(Exception):
    """A trial that failed on its own (its reason is in the trial's ``error`` attribute)."""


class StudyFull(Exception):
    """A trial started when the study already had its trials (two processes asked at once)."""


def tune_parser() -> TuneArgumentParser:
    parser = TuneArgumentParser(
        prog="python -m gptlit tune",
        allow_abbrev=False,
        description="A hyperparameter search with Optuna: each trial is a fit of --config with values drawn from "
        "--search; every other option is a fit option given to every trial (python -m gptlit fit --help).",
    )
    add = parser.add_argument
    add("-c", "--config", action="append", default=[], help="the fit config of every trial (as fit takes it)")
    add("--search", help="the search space: a YAML file, one fit option a line (configs/search/tiny.yaml)")
    add("--trials", type=int, default=20, help="finished trials the study should have, counting earlier ones")
    add("--study_name", help="the study's name (default: <config>-<search>, of their file names)")
    add("--storage", help="an Optuna storage URL (default: sqlite:///<root>/lightning_logs/<study>/study.db)")
    add("--show", action="store_true", help="print the study's table and write best.yaml; train nothing")
    add("--sampler", choices=("tpe", "random"), default="tpe", help="how values are drawn (default: tpe)")
    add("--startup_trials", type=int, default=10, help="random trials before TPE models the scores (default: 10)")
    add("--score_tokens", type=int, default=1_000_000, help="validation tokens a trial is scored on (0: all)")
    add("--seed", type=int, help="the sampler's seed (leave it unset when several processes share a study)")
    add("--pruner", choices=("median", "none"), default="median", help="stop trials worse than the median")
    add("--prune_after", type=int, default=5, help="finished trials before the median pruner prunes (default: 5)")
    return parser


def tune(args: list[str]) -> None:
    """``python -m gptlit tune [options] [fit options]``."""
    options, fit_options = tune_parser().parse_known_args(args)
    optuna = _import_optuna()
    if options.trials < 1:
        raise UsageError(f"--trials {options.trials}: give at least 1")
    bad = next((name for name in ("startup_trials", "prune_after", "score_tokens") if getattr(options, name) < 0), None)
    if bad:
        raise UsageError(f"--{bad} {getattr(options, bad)}: give 0 or more")
    if not options.show and not options.search:
        raise UsageError("give --search <file> (the search space; see configs/search/tiny.yaml), or --show")
    root = _root_dir(fit_options, options.config)
    study_name = options.study_name or _default_study_name(options)
    if not re.fullmatch(r"[\w.-]+", study_name):
        raise UsageError(f"--study_name {study_name!r}: use letters, digits, '.', '-' and '_' (it names a directory)")
    study_dir = Path(root or os.getcwd()) / "lightning_logs" / study_name
    url = options.storage or f"sqlite:///{os.path.abspath(study_dir / STUDY_FILE)}"
    if options.show:
        show(optuna, url, study_name, study_dir, root)
        return
    params = read_search(options.search)
    base = [arg for config in options.config for arg in ("--config", config)] + fit_options
    check_fit_options(base + fit_args({p.key: p.first() for p in params}), options.search)
    study_dir.mkdir(parents=True, exist_ok=True)
    storage = open_storage(optuna, url)
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        sampler=_sampler(optuna, options),
        pruner=_pruner(optuna, options),
        direction="minimize",
        load_if_exists=True,
    )
    search = Search(optuna, study, storage, params, base, study_dir, options.trials, options.score_tokens or None)
    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, _interrupt),  # stopped as by Ctrl-C: the running trial too
        signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),  # also when started ignoring it
    }
    try:
        search.run()
    except KeyboardInterrupt:
        done = search.finished()
        print(
            f"gptlit: tune stopped: {done} of {options.trials} trials finished in {shown(study_dir)}; the same "
            "command continues the study",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    show(optuna, url, study_name, study_dir, root, storage=storage)


class Search:
    """The loop of one tune process: start trials until the study has its ``trials`` (other processes' included)."""

    def __init__(
        self,
        optuna: Any,
        study: Any,
        storage: Any,
        params: list[Param],
        base: list[str],
        study_dir: Path,
        trials: int,
        score_tokens: int | None = None,
    ) -> None:
        self.optuna, self.study, self.storage, self.params = optuna, study, storage, params
        self.base, self.study_dir, self.trials, self.score_tokens = base, study_dir, trials, score_tokens
        self.State = optuna.trial.TrialState

    def finished(self) -> int:
        return sum(counts(t, self.State) for t in self.study.get_trials(deepcopy=False))

    def run(self) -> None:
        while True:
            lost = mark_lost_trials(self.study, self.storage, self.State)
            if lost:
                numbers = ", ".join(map(str, lost))
                print(f"gptlit: trial {numbers} lost its tune process; marked failed", file=sys.stderr)
            trials = self.study.get_trials(deepcopy=False)
            taken = sum(counts(t, self.State) or t.state == self.State.RUNNING for t in trials)
            if taken >= self.trials:
                return
            self.study.optimize(self.objective, n_trials=1, catch=(TrialFailed, StudyFull), gc_after_trial=False)

    def objective(self, trial: Any) -> float:
        trial.set_user_attr(WORKER, worker())
        earlier = [t for t in self.study.get_trials(deepcopy=False) if t.number < trial.number]
        if sum(counts(t, self.State) or t.state == self.State.RUNNING for t in earlier) >= self.trials:
            trial.set_user_attr(SURPLUS, True)  # another process took the last trial first
            raise StudyFull
        values = {param.key: param.suggest(trial) for param in self.params}
        files = TrialFiles(self.study_dir, f"trial-{trial.number:03d}")
        drawn = ", ".join(f"{key} {shown_value(value)}" for key, value in values.items())
        print(f"gptlit: trial {trial.number} ({drawn}) in {shown(files.run)}, log {shown(files.log)}", file=sys.stderr)

        def should_stop(step: int, value: float) -> bool:
            trial.report(value, step)
            trial.set_user_attr(STEPS, step)
            return trial.should_prune()

        outcome = run_fit(fit_command(self.base + fit_args(values), files), files, should_stop)
        if outcome.stopped_at is not None:
            step, value = outcome.stopped_at
            print(f"gptlit: trial {trial.number} pruned at step {step} (val bpb {value:.4f})", file=sys.stderr)
            raise self.optuna.TrialPruned(f"val/bpb {value:.4f} at step {step}")
        if outcome.returncode == STOPPED_CODE:  # Ctrl-C or SIGTERM reached the trial: the search stops with it
            raise KeyboardInterrupt
        if outcome.returncode != 0:
            return self._fail(trial, outcome.error(files.log))
        return self._score(trial, files, values)

    def _score(self, trial: Any, files: TrialFiles, values: dict[str, Any]) -> float:
        config = yaml.safe_load((files.run / "config.yaml").read_text(encoding="utf-8"))
        try:
            checkpoint = read_checkpoint(files.run / "checkpoints" / "last.ckpt")
        except GptlitError as err:
            return self._fail(trial, str(err))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            bpb = checkpoint_bpb(checkpoint, config["data"]["data_dir"], device, self.score_tokens)
        except GptlitError as err:  # a validation split shorter than a window, or gone
            return self._fail(trial, str(err))
        step = checkpoint["global_step"]
        trial.set_user_attr(STEPS, step)
        if not math.isfinite(bpb):
            return self._fail(trial, f"its last checkpoint scores {bpb} bits per byte")
        log_hparams(files.run, values, bpb, step)
        print(f"gptlit: trial {trial.number}: val bpb {bpb:.4f} after {step} steps", file=sys.stderr)
        return bpb

    def _fail(self, trial: Any, reason: str) -> NoReturn:
        trial.set_user_attr(ERROR, reason)
        print(f"gptlit: trial {trial.number} failed: {reason}", file=sys.stderr)
        raise TrialFailed(reason)


def show(optuna: Any, url: str, study_name: str, study_dir: Path, root: str | None, storage: Any = None) -> None:
    """Print the study's table, and write its best trial's config as ``best.yaml``."""
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise UsageError(f"no study '{study_name}' in {study_dir}: start it with --search, or name it (--study_name)")
    try:
        study = optuna.load_study(study_name=study_name, storage=storage or open_storage(optuna, url))
    except KeyError as err:
        raise UsageError(f"no study '{study_name}' in {url}; start it with --search") from err
    State = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    print(f"Study '{study_name}' ({url}): {sum(counts(t, State) for t in trials)} trials finished")
    print(table(trials, State))
    complete = [t for t in trials if t.state == State.COMPLETE]
    if not complete:
        return
    best = min(complete, key=lambda t: t.value)
    path = write_best(study_dir, best, root)
    print(f"\nbest: trial {best.number}, val bpb {best.value:.4f}; its config: {shown(path)}")
    print(f"  train it: python -m gptlit fit --config {shown(path)}")
    print(f"  watch:    tensorboard --logdir {shown(study_dir)}   (HPARAMS compares the trials)")


def check_fit_options(args: list[str], search: str) -> None:
    """Refuse, in one line and before any training, options that ``fit`` would not take: the config, the shared
    options and the search's keys (with each one's first value), parsed by ``fit --print_config``."""
    command = [sys.executable, "-m", "gptlit", "fit", *args, "--print_config"]
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        message = next((ln for ln in reversed(lines) if ln.startswith("gptlit: error: ")), lines[-1] if lines else "")
        given = f"the config, the other options and the first values of {search}"
        raise UsageError(f"fit refuses the trials' options ({given}): {message.removeprefix('gptlit: error: ')}")


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError as err:
        raise UsageError(f"tune needs Optuna, which is not installed: {INSTALL}") from err
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # tune says what each trial did itself
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def _sampler(optuna: Any, options: argparse.Namespace) -> Any:
    if options.sampler == "random":
        return optuna.samplers.RandomSampler(seed=options.seed)
    return optuna.samplers.TPESampler(n_startup_trials=options.startup_trials, seed=options.seed)


def _pruner(optuna: Any, options: argparse.Namespace) -> Any:
    if options.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=options.prune_after)


def _default_study_name(options: argparse.Namespace) -> str:
    if not options.config or not options.search:
        raise UsageError("name the study: --study_name <name>, or give --config and --search (it is named after them)")
    return f"{Path(options.config[-1]).stem}-{Path(options.search).stem}"


def _root_dir(fit_options: list[str], configs: list[str]) -> str | None:
    """The run root the trials share: ``--trainer.default_root_dir``, else the last config's, else none (here)."""
    for i, arg in enumerate(fit_options):
        if arg == "--trainer.default_root_dir" and i + 1 < len(fit_options):
            root = fit_options[i + 1]
        elif arg.startswith("--trainer.default_root_dir="):
            root = arg.split("=", 1)[1]
        else:
            continue
        return None if root in ("null", "None", "") else root
    for config in reversed(configs):
        try:
            settings = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            continue  # fit --print_config says what is wrong with it
        root = (settings.get("trainer") or {}).get("default_root_dir") if isinstance(settings, dict) else None
        if root:
            return str(root)
    return None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
