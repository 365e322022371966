"""The few private parts of Lightning that gptlit relies on, in one place.

Each is pinned by a test in ``tests/test_lightning_private.py``: a Lightning upgrade that changes one fails
there, by name, instead of somewhere in a training run.
"""

from __future__ import annotations

import lightning as L


def request_stop(trainer: L.Trainer) -> None:
    """Stop training after the current batch, as Lightning does on SIGTERM (``trainer.received_sigterm``).

    Lightning then raises ``SIGTERMException`` between two batches, calls ``on_exception`` of every callback
    (gptlit's ``LastCheckpoint`` saves there) and ends the run; ``trainer.should_stop`` would instead mark the
    epoch complete, which a resumed run cannot continue exactly.
    """
    trainer._signal_connector.received_sigterm = True


class KeepConfigOverCheckpoint:
    """A LightningCLI mixin: the model settings come from the config, never from a ``--ckpt_path`` file.

    LightningCLI (since 2.5) replaces the model settings with the hyperparameters saved in a ``--ckpt_path``
    file, in its private ``_parse_ckpt_path``, loading the file before gptlit has checked it: ``--model...``
    options would be silently ignored, and a file that is not a plain checkpoint would end in a traceback.
    gptlit keeps the config it is given (the checkpoint's own run's when there is no ``--config``), and checks
    the checkpoint against it.
    """

    def _parse_ckpt_path(self) -> None:
        pass


def set_max_steps(trainer: L.Trainer, steps: int) -> None:
    """Change ``trainer.max_steps`` of a running fit: the loop stops once ``global_step`` reaches it.

    ``trainer.max_steps`` reads the training epoch loop's ``max_steps``, which the loop checks after every step
    and which has no public setter.
    """
    trainer.fit_loop.epoch_loop.max_steps = steps


def resume_after_validation(trainer: L.Trainer) -> None:
    """Have a resumed run take the step it resumes at as validated, as it does a step of ``val_check_interval``.

    Lightning decides whether to validate after a step in ``_should_check_val_fx``, and asks it once more as a
    resumed run starts: yes, for a state saved during that step's validation, finishes the step's bookkeeping (the
    count of stepped batches that logged metrics are stepped by) instead of training. A validation Lightning did
    not schedule itself (one asked for with ``trainer.should_stop``) would be answered no. Call from
    ``on_train_start`` of a resumed run: only that next answer is changed.
    """
    loop = trainer.fit_loop.epoch_loop
    if not loop.restarting:
        return

    def validated(data_fetcher) -> bool:
        del loop._should_check_val_fx  # Lightning's own method again
        return True

    loop._should_check_val_fx = validated
