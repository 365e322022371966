"""Training: the LightningModule, optimizers and schedules, run directories, and the callbacks a config names
by class path (``gptlit.training.TextSamples``):

- `gptlit.training.checkpoint_callbacks`: ``LastCheckpoint`` (``last.ckpt``), ``BestCheckpoint`` (``best.ckpt``),
  ``StableCheckpoint`` (``stable.ckpt``), atomic writes;
- `gptlit.training.stopping`: ``GracefulStop`` (Ctrl-C ends a run between two batches, with ``last.ckpt`` saved),
  ``ValidateAtEnd`` (a run that reaches max_steps ends with a validation);
- `gptlit.training.budget_callback`: ``TimeBudget`` (the schedule planned over ``trainer.max_time``);
- `gptlit.training.text_samples`: ``TextSamples`` (stories in TensorBoard after each validation).
"""

from gptlit.faces import lazy_names

__getattr__, __dir__ = lazy_names(
    __name__,
    {
        "GPTLitModule": "gptlit.training.module",
        "AtomicCheckpointIO": "gptlit.training.checkpoint_callbacks",
        "BestCheckpoint": "gptlit.training.checkpoint_callbacks",
        "StableCheckpoint": "gptlit.training.checkpoint_callbacks",
        "ValidateAtEnd": "gptlit.training.stopping",
        "TimeBudget": "gptlit.training.budget_callback",
        "LastCheckpoint": "gptlit.training.checkpoint_callbacks",
        "GracefulStop": "gptlit.training.stopping",
        "TextSamples": "gptlit.training.text_samples",
        "sample_markdown": "gptlit.training.text_samples",
    },
)
