"""Module paths of gptlit 0.2.0, whose modules now live in subpackages: each old path imports its new module.

A user's code or a saved ``config.yaml`` that names ``gptlit.callbacks.TextSamples`` or ``gptlit.generate``
keeps working; ``python -W error::DeprecationWarning`` shows where an old path is used.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

# gptlit 0.2.0's module -> where it lives now
MOVED = {
    "gptlit.callbacks": "gptlit.training",
    "gptlit.checkpointing": "gptlit.training.checkpoint_callbacks",
    "gptlit.config": "gptlit.model.config",
    "gptlit.draft": "gptlit.generation.draft",
    "gptlit.generate": "gptlit.generation.generate",
    "gptlit.hf_mapping": "gptlit.export.architectures",
    "gptlit.lightning_private": "gptlit.training.lightning_private",
    "gptlit.loss": "gptlit.model.loss",
    "gptlit.module": "gptlit.training.module",
    "gptlit.optim": "gptlit.training.optim",
    "gptlit.prepare": "gptlit.data.prepare",
    "gptlit.rope": "gptlit.model.rope",
    "gptlit.run_config": "gptlit.cli.run_config",
    "gptlit.runs": "gptlit.training.runs",
    "gptlit.sample": "gptlit.cli.sample",
    "gptlit.sampling": "gptlit.generation.decoding",
    "gptlit.sources": "gptlit.data.sources",
    "gptlit.stopping": "gptlit.training.stopping",
    "gptlit.store": "gptlit.data.store",
    "gptlit.text_samples": "gptlit.training.text_samples",
    "gptlit.tokenizer": "gptlit.data.tokenizer",
}


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module path and hands out the module that lives at its new one."""

    def find_spec(self, name: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        return importlib.machinery.ModuleSpec(name, self) if name in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        new = MOVED[module.__name__]
        warnings.warn(f"{module.__name__} is {new} since gptlit 0.3", DeprecationWarning, stacklevel=2)
        sys.modules[module.__name__] = importlib.import_module(new)  # the import statement returns this


def new_class_path(class_path: str) -> str:
    """``class_path`` (``gptlit.callbacks.TextSamples``) at the module that now holds it (``gptlit.training``)."""
    module, _, name = class_path.rpartition(".")
    return f"{MOVED[module]}.{name}" if module in MOVED else class_path


def install() -> None:
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModules())  # before an editable install's finder, which may see stale files
