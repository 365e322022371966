"""The ``data.*`` options that say what a data directory is prepared from, and how, as one object checked once."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from gptlit.errors import DataError

# The options that choose which texts are read; meta.json records those that differ from their defaults.
READING_OPTIONS = ("config_name", "text_field", "train_split", "val_split")


@dataclass(frozen=True)
class DataOptions:
    """What a data directory is prepared from, and how: the ``data.*`` options preparation reads, checked once.

    The data module builds it from its own arguments and passes it to :func:`gptlit.data.prepare.prepare_dataset`;
    each option means what it means on :class:`gptlit.data.datamodule.TextDataModule`, whose Args document them all.
    """

    source: str = "roneneldan/TinyStories"
    config_name: str | None = None
    text_field: str = "text"
    train_split: str = "train"
    val_split: str | None = "validation"
    val_fraction: float = 0.01
    seed: int = 1337
    vocab_size: int | None = 8000
    tokenizer_path: str | None = None
    tokenizer_train_stories: int | None = 100_000

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        for name in ("source", "config_name", "text_field", "train_split", "val_split"):
            if getattr(self, name) == "":
                raise DataError(f"{name} is empty; give a name (see --help for its default)")
        if self.val_split == self.train_split:
            raise DataError(
                f"train_split and val_split are both '{self.train_split}': name another split for validation, "
                "or set --data.val_split null to hold val_fraction of it out"
            )

    def reading(self) -> dict[str, Any]:
        """The reading options that differ from their defaults (an earlier gptlit's meta.json records none)."""
        defaults = {f.name: f.default for f in fields(self)}
        return {name: getattr(self, name) for name in READING_OPTIONS if getattr(self, name) != defaults[name]}
