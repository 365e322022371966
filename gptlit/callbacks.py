"""The callbacks a config names by class path (``gptlit.callbacks.TextSamples``), each defined by concern in:

- `gptlit.checkpointing`: ``LastCheckpoint`` (``last.ckpt``), ``BestCheckpoint`` (``best.ckpt``),
  ``StableCheckpoint`` (``stable.ckpt``), atomic writes;
- `gptlit.stopping`: ``GracefulStop`` (Ctrl-C ends a run between two batches, with ``last.ckpt`` saved),
  ``ValidateAtEnd`` (a run that reaches max_steps ends with a validation);
- `gptlit.budget_callback`: ``TimeBudget`` (the schedule planned over ``trainer.max_time``);
- `gptlit.text_samples`: ``TextSamples`` (stories in TensorBoard after each validation);
- `gptlit.run_config`: ``SaveRunConfig`` (the run's ``config.yaml``).
"""

from gptlit.budget_callback import TimeBudget
from gptlit.checkpointing import AtomicCheckpointIO, BestCheckpoint, LastCheckpoint, StableCheckpoint
from gptlit.run_config import SaveRunConfig
from gptlit.stopping import GracefulStop, ValidateAtEnd
from gptlit.text_samples import TextSamples, sample_markdown

__all__ = [
    "AtomicCheckpointIO",
    "BestCheckpoint",
    "GracefulStop",
    "LastCheckpoint",
    "SaveRunConfig",
    "StableCheckpoint",
    "TextSamples",
    "TimeBudget",
    "ValidateAtEnd",
    "sample_markdown",
]
