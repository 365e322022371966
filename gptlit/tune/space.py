"""The search space of ``gptlit tune``: a YAML file, one ``fit`` option a line, with the arguments of Optuna's
``suggest_*`` call for it.

    model.learning_rate: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
    model.config.n_layers: {type: int, low: 2, high: 6}
    model.config.mlp: {type: categorical, choices: [gelu, swiglu]}

Every range is checked here, before anything trains; whether ``fit`` knows the keys and takes the values is
checked by the tune command, with one ``fit --print_config`` of the first values (`Param.first`).
This module does not import Optuna: a trial only needs to have its ``suggest_*`` methods.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gptlit.errors import ConfigError, UsageError

TYPES = ("float", "int", "categorical")
# The arguments each type takes, as Optuna's suggest_float, suggest_int and suggest_categorical do.
FIELDS = {"float": ("low", "high", "log", "step"), "int": ("low", "high", "log", "step"), "categorical": ("choices",)}
# Options the tune command gives every trial itself.
RESERVED = ("config", "run_name", "overwrite", "ckpt_path", "trainer.default_root_dir")
_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
Value = None | bool | int | float | str


@dataclass(frozen=True)
class Param:
    """One searched option: ``key`` (dotted, as on the command line) and the arguments of its ``suggest_*`` call.

    Args:
        key: The ``fit`` option, e.g. ``model.learning_rate``.
        type: ``float``, ``int`` or ``categorical``.
        low: The smallest value (float, int).
        high: The largest value (float, int).
        log: Drawn on a log scale (float, int).
        step: Drawn on a grid of this step from ``low`` (float, int; int's default is 1).
        choices: The values to choose from (categorical).
    """

    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Value, ...] = ()

    def suggest(self, trial: Any) -> Value:
        """The value an Optuna trial draws for this option."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def first(self) -> Value:
        """A value every search of this option may draw: ``low``, or the first choice."""
        return self.choices[0] if self.type == "categorical" else self.low


def read_search(path: str | Path) -> list[Param]:
    """The options a search file searches, each checked; a mistake is refused in one line naming the key."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"search file {path} not found; see configs/search/tiny.yaml for an example")
    try:
        entries = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from err
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(
            f"{path} holds no search: write one option a line, e.g. "
            "`model.learning_rate: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}`"
        )
    return [_param(str(key), spec, path) for key, spec in entries.items()]


def fit_args(values: dict[str, Value]) -> list[str]:
    """The ``fit`` command-line options that set ``values`` (``--model.config.mlp=swiglu``)."""
    return [f"--{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in values.items()]


def _param(key: str, spec: Any, path: Path) -> Param:
    where = f"{path}: {key}"
    if not _KEY.fullmatch(key):
        raise ConfigError(f"{where}: not an option name; write a fit option's dotted key, e.g. model.learning_rate")
    if key in RESERVED:
        raise ConfigError(f"{where}: tune sets this option for every trial itself; search other options")
    if not isinstance(spec, dict) or spec.get("type") not in TYPES:
        got = spec.get("type") if isinstance(spec, dict) else spec
        example = "{type: float, low: 0.1, high: 1}"
        raise ConfigError(f"{where}: type {got!r} is not one of {', '.join(TYPES)}; e.g. {example}")
    kind = spec["type"]
    unknown = sorted(set(spec) - {"type", *FIELDS[kind]})
    if unknown:
        raise ConfigError(f"{where}: {kind} takes {', '.join(FIELDS[kind])}, not {', '.join(map(str, unknown))}")
    if kind == "categorical":
        return Param(key, kind, choices=_choices(spec.get("choices"), where))
    number = _integer if kind == "int" else _real
    low, high = number(spec.get("low"), f"{where}: low"), number(spec.get("high"), f"{where}: high")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false, not {log!r}")
    step = None if spec.get("step") is None else number(spec["step"], f"{where}: step")
    if low > high:
        raise ConfigError(f"{where}: low {low} is above high {high}; swap them")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log scale needs low > 0, not {low}; raise low or drop log")
    if kind == "int" and log and low < 1:
        raise ConfigError(f"{where}: an int on a log scale needs low >= 1, not {low}")
    if step is not None and step <= 0:
        raise ConfigError(f"{where}: step must be positive, not {step}")
    if log and step not in (None, 1):
        raise ConfigError(f"{where}: log and step do not go together (Optuna draws one or the other); drop one")
    return Param(key, kind, low=low, high=high, log=log, step=step)


def _real(value: Any, where: str) -> float:
    """A finite number; text such as ``1e-3`` (which YAML reads as text, wanting ``1.0e-3``) is read as one too."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, not {value!r}")
    return float(value)


def _integer(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be an integer, not {value!r}")
    return value


def _choices(choices: Any, where: str) -> tuple[Value, ...]:
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{where}: choices must be a non-empty list, e.g. choices: [gelu, swiglu]")
    for choice in choices:
        if choice is not None and not isinstance(choice, (bool, int, float, str)):
            raise ConfigError(f"{where}: choice {choice!r} is not a plain value (a number, text, true, false, null)")
    if len(set(map(json.dumps, choices))) < len(choices):
        raise ConfigError(f"{where}: choices {choices} repeat a value; list each once")
    return tuple(choices)
