"""gptlit's error types: problems with what gptlit was given, each told in one line that says what to do.

The command line prints these (and the parser's own errors) as one ``gptlit: error: ...`` line. Any other
exception is a bug, in gptlit or in an edit of it, and keeps its traceback.
"""

from __future__ import annotations


class GptlitError(Exception):
    """A problem with gptlit's input or environment, not a bug: reported as one line."""


class UsageError(GptlitError, ValueError):
    """A mistake in how gptlit was called: an argument, a path, a checkpoint that does not fit."""


class ConfigError(UsageError):
    """A command line or config file that the parser or a config class rejects."""


class DataError(UsageError):
    """A problem with the data or its files, told in one line that names the file and what to do."""


class MissingFileError(DataError, FileNotFoundError):
    """A file gptlit needs does not exist."""


class NonFiniteLossError(GptlitError, RuntimeError):
    """The training loss became NaN or infinite."""
