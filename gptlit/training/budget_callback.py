"""TimeBudget: the learning-rate schedule laid out over ``trainer.max_time`` (`gptlit.training.budget.BudgetPlan`)."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, Timer, TQDMProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.optim.lr_scheduler import LambdaLR

from gptlit.errors import UsageError
from gptlit.training.budget import BudgetPlan, StepRate
from gptlit.training.lightning_private import set_max_steps
from gptlit.training.progress import StepProgressBar


class TimeBudget(L.Callback):
    """Plans the schedule of a run given ``trainer.max_time``, and ends the run at the planned step.

    Inactive without ``max_time``. With it, the time per optimizer step is measured as the budget's time spent
    (Lightning's ``Timer``: validation, checkpoint writing and logging included) over the steps taken, leaving out
    each process's first steps (`gptlit.training.budget.StepRate`); the plan (`BudgetPlan`) is re-made after every
    step until its decay begins, then frozen. ``trainer.max_steps`` follows the plan, so the progress bar shows the
    planned steps and the run stops at the last one, with a final validation and ``last.ckpt``, before ``max_time``
    (which stays the hard stop). The plan travels in the checkpoint, and ``Timer`` saves the time spent: a resumed
    run goes on with the same plan and the budget's remaining time. Plans are logged when made, when they change by
    more than 10%, and when frozen.
    """

    def __init__(self) -> None:
        self.plan: BudgetPlan | None = None
        self._timer: Timer | None = None
        self._saved: dict[str, Any] | None = None
        self._rate = StepRate()
        self._step_seen = -1
        self._batch_end: float | None = None  # monotonic time of the latest batch's end
        self._validation_start: float | None = None
        self._validation_here = 0.0  # validation time since the latest batch's end
        self._validated = False  # a real validation measured: the sanity check's estimate is no longer used

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
        remaining = timer.time_remaining() if timer is not None else None
        if stage != "fit" or remaining is None:
            return
        hp = pl_module.hparams
        self._timer = timer
        self.plan = BudgetPlan(
            budget_s=timer.time_elapsed() + remaining,
            schedule=hp.schedule,
            warmup=hp.warmup,
            decay_fraction=hp.decay_fraction,
            min_ratio=hp.min_lr / hp.learning_rate,
            max_steps=trainer.max_steps,
        )
        if self._saved:
            self.plan.load_state_dict(self._saved)
        pl_module.budget_plan = self.plan  # its learning-rate schedule asks the plan

    def state_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.state_dict()} if self.plan is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved = state_dict.get("plan")
        if self.plan is not None and self._saved:
            self.plan.load_state_dict(self._saved)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.plan is None:
            return
        self._rate, self._step_seen = StepRate(), trainer.global_step
        if self._saved and self.plan.frozen:
            self._extend(trainer.global_step, trainer.ckpt_path)
        if self.plan.total is not None:
            rank_zero_info(f"Resuming the plan of {self.plan.describe()}")
            self._follow(trainer, batches_done=0)

    def _extend(self, step: int, ckpt_path: str | None) -> None:
        """A resume with another budget or step cap than the frozen plan's: from the plan's decay start (the state
        ``stable.ckpt`` holds) the plan is made anew over the new budget, and decays once, at its end; from a
        state past it, refused in one line (the rate would jump mid-decay)."""
        plan, saved = self.plan, self._saved
        if (saved.get("budget_s"), saved.get("max_steps")) == (plan.budget_s, plan.max_steps):
            return
        if step <= plan.decay_start:
            plan.decay_start, plan.noted, plan.shortened = None, None, None
            rank_zero_info(f"gptlit: a plan made anew from step {step}, for a {plan.describe().split(':')[0]}")
            return
        own = clock(saved["budget_s"])
        raise UsageError(
            f"{ckpt_path} is at step {step}, past the start of its learning-rate decay (step {plan.decay_start} of "
            f"{plan.total}, planned for {own}): another trainer.max_time or max_steps would lay the decay anew "
            f"mid-way; extend the run from the state before its decay with --ckpt_path stable and the new "
            f"--trainer.max_time, or resume with --trainer.max_time {own}"
        )

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.plan is None:
            return
        if self._batch_end is not None:  # what happened between two batches, validation aside
            pause = time.monotonic() - self._batch_end - self._validation_here
            self.plan.pause_s = max(self.plan.pause_s, pause)
        self._validation_here = 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.plan is None:
            return
        self._batch_end = time.monotonic()
        step = trainer.global_step
        if step == self._step_seen:  # a batch accumulated, no optimizer step
            return
        self._step_seen = step
        elapsed = self._timer.time_elapsed()
        changed = self.plan.update(step, elapsed, self._rate.record(step, elapsed))
        # Every process follows the first one's plan (their clocks differ a little).
        changed, state = trainer.strategy.broadcast((changed, self.plan.state_dict()))
        self.plan.load_state_dict(state)
        if changed:
            rank_zero_info(self.plan.describe())
        self._follow(trainer, batches_done=batch_idx + 1)
        if self.plan.frozen and step >= self.plan.total:
            trainer.should_stop = True  # Lightning validates a run that stops early: the final validation

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_start = time.monotonic()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.plan is None or self._validation_start is None:
            return
        took = time.monotonic() - self._validation_start
        if trainer.sanity_checking:  # a first estimate, scaled to a full validation
            sanity, full = sum(trainer.num_sanity_val_batches), sum(trainer.num_val_batches)
            if not self._validated and sanity:
                self.plan.validation_s = max(self.plan.validation_s, took * full / sanity)
            return
        self.plan.validation_s = max(self.plan.validation_s, took) if self._validated else took
        self._validated = True
        self._validation_here += took
        self._rate.add_validation(took)

    def _follow(self, trainer: L.Trainer, batches_done: int) -> None:
        """Make the trainer follow the plan: where to stop, the progress bar's total, the next step's rate."""
        # The schedulers set the next step's rate before this step's plan was made: set it again from the plan.
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if not isinstance(scheduler, LambdaLR):
                continue
            groups = scheduler.optimizer.param_groups
            for group, base_lr, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
                group["lr"] = base_lr * factor(scheduler.last_epoch)

        if self.plan.total is None:
            return
        step = trainer.global_step
        set_max_steps(trainer, self.plan.total if self.plan.frozen else max(self.plan.total, step + 1))
        _show_total(trainer, batches_done + (trainer.max_steps - step) * trainer.accumulate_grad_batches)


def clock(seconds: float) -> str:
    """Seconds as ``trainer.max_time`` writes them: ``DD:HH:MM:SS``."""
    minutes, second = divmod(round(seconds), 60)
    hours, minute = divmod(minutes, 60)
    days, hour = divmod(hours, 24)
    return f"{days:02d}:{hour:02d}:{minute:02d}:{second:02d}"


def _show_total(trainer: L.Trainer, batches: int) -> None:
    """Set the progress bar's total: gptlit's bar counts the run's optimizer steps (``trainer.max_steps``), another
    bar this epoch's batches (``batches``, at most the epoch's)."""
    bar = trainer.progress_bar_callback
    total = trainer.max_steps if isinstance(bar, StepProgressBar) else min(trainer.num_training_batches, batches)
    if isinstance(bar, RichProgressBar) and bar.progress is not None and bar.train_progress_bar_id is not None:
        bar.progress.update(bar.train_progress_bar_id, total=total)
    elif isinstance(bar, TQDMProgressBar):
        with contextlib.suppress(TypeError):  # no bar yet
            bar.train_progress_bar.total = total
