"""gptlit: train a small GPT from scratch on TinyStories with PyTorch Lightning, and sample stories from it.

The public face, imported on first use (``import gptlit`` itself stays light)::

    from gptlit import GPT, GPTConfig, Tokenizer

    model = GPT.load_from_checkpoint("lightning_logs/tiny/checkpoints/best.ckpt")
    tokenizer = Tokenizer.from_checkpoint("lightning_logs/tiny/checkpoints/best.ckpt")
    ids = model.generate(token_ids=tokenizer.encode("Once upon a time", bos=True), max_new_tokens=100)
    print(tokenizer.decode(ids))

Batched sampling with streaming, eos and drafted decoding: ``from gptlit.generation.generate import generate``.
"""

from __future__ import annotations

import importlib
from typing import Any

from gptlit import moved
from gptlit.model.config import GPTConfig

__version__ = "0.3.0.dev0"

moved.install()  # the module paths of gptlit 0.2.0 keep importing

# name -> the module that defines it
_PUBLIC = {
    "GPT": "gptlit.model.gpt",
    "Tokenizer": "gptlit.data.tokenizer",
    "NgramTable": "gptlit.generation.draft",
    "GPTLitModule": "gptlit.training.module",
    "TextDataModule": "gptlit.data.datamodule",
    "load_model": "gptlit.training.runs",
    "cli_main": "gptlit.cli.main",
}
__all__ = ["GPTConfig", *_PUBLIC]
_EARLIER_NAMES = {"TinyStoriesDataModule": "gptlit.data.datamodule"}  # still importable: another name of a public class


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name) or _EARLIER_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'gptlit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access finds it directly
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
