"""The callbacks a config names by class path (``gptlit.callbacks.TextSamples``), each defined by concern in:

- `gptlit.checkpointing`: ``LastCheckpoint`` (``last.ckpt``), ``BestCheckpoint`` (``best.ckpt``), atomic writes;
- `gptlit.stopping`: ``GracefulStop`` (Ctrl-C ends a run between two batches, with ``last.ckpt`` saved);
- `gptlit.budget_callback`: ``TimeBudget`` (the schedule planned over ``trainer.max_time``);
- `gptlit.text_samples`: ``TextSamples`` (stories in TensorBoard after each validation);
- `gptlit.run_config`: ``SaveRunConfig`` (the run's ``config.yaml``).
"""

from gptlit.budget_callback import TimeBudget
from gptlit.checkpointing import AtomicCheckpointIO, BestCheckpoint, LastCheckpoint
from gptlit.run_config import SaveRunConfig
from gptlit.stopping import GracefulStop
from gptlit.text_samples import TextSamples, sample_markdown

__all__ = [
    "AtomicCheckpointIO",
    "BestCheckpoint",
    "GracefulStop",
    "LastCheckpoint",
    "SaveRunConfig",
    "TextSamples",
    "TimeBudget",
    "sample_markdown",
]
