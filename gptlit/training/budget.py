"""Training to a time budget: the learning-rate schedule laid out over ``trainer.max_time`` instead of a step count.

`BudgetPlan` is the planning alone, with no clock of its own and no Lightning: it is told, after each optimizer
step, how many steps are done and how much of the budget they took (wall time, validation, checkpoint writing and
logging included), and answers with the planned number of steps and each step's learning-rate multiplier.
`gptlit.training.budget_callback.TimeBudget` feeds it from Lightning's ``Timer`` and ends the run at the planned step.

The plan:

- The steps that fit are ``steps done + time left / seconds per step``, where the time left keeps a reserve for
  the final validation and checkpoint (measured) and one step more; re-estimated after every step while the rate
  is flat, and capped at ``trainer.max_steps`` when one is given too. The seconds per step (`StepRate`) are
  those of the latest quarter of the steps measured (when the decay begins, a stretch as long as the decay), so
  that a machine that slows down is seen, plus validation's mean cost per step, which a window of steps would
  catch unevenly.
- Warmup given as a step count is that many steps. Given as a fraction, it is that fraction of the budget's *time*:
  the number of steps is not known when warmup runs, and an estimate made from the first few steps would change
  under it; the rate rises linearly with the time spent, and the steps it took are fixed when it ends.
- wsd: the peak rate until ``1 - decay_fraction`` of the budget (less the reserve) has passed, or the planned
  steps left are ``decay_fraction`` of them; then the plan is frozen (steps and decay start no longer change) and
  the rate decays linearly to ``min_lr``, reached at the last planned step.
- A frozen plan keeps `SLACK` of the decay's time free. A machine that slows down by more than that (another job
  on the CPU) would reach ``max_time`` before the last planned step, mid-decay: the plan is then shortened to the
  steps that still fit, and the rate goes on from where it stands down to ``min_lr`` at the new last step.
- cosine: the cosine is laid out over the current estimate, re-estimated like wsd's stable phase and frozen at the
  same point. The cosine is flat at its start, where the estimate is least certain, so an estimate that moves
  moves the rate little; after the freeze it is a function of the step, ending at ``min_lr``.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass, fields
from typing import Any

from gptlit.training.optim import lr_factor, wsd_factor

# Steps of each process whose time is not measured: the first batches, compilation and allocation, and after a
# resume the sanity check's aftermath, all cost more than a step of the run.
UNMEASURED_STEPS = 3
# A change of the planned steps by more than this share of the steps last logged is worth a line in the log, at
# most once every NOTE_EVERY of the budget.
NOTEWORTHY_CHANGE = 0.1
NOTE_EVERY = 0.05
# Kept free of steps: this share of the decay's time, against a machine that slows down while the plan is frozen.
SLACK = 0.05
# Steps whose median time tells a frozen plan that the machine slowed down.
RECENT_STEPS = 9


class StepRate:
    """Seconds per optimizer step of this process, all costs included: training, logging and checkpoint writing
    over the latest quarter of the steps measured, plus the validations' time spread over all of them. Each
    process's first `UNMEASURED_STEPS` are left out."""

    def __init__(self) -> None:
        self._points: list[tuple[int, float]] = []  # (step, time spent outside validation)
        self._validation_s = 0.0  # validation time in this process
        self._validation_before = 0.0  # ... before the first step measured

    def add_validation(self, seconds: float) -> None:
        self._validation_s += seconds

    def record(self, step: int, elapsed_s: float) -> float | None:
        """Take in the state after an optimizer step; the seconds per step, or None while too few are measured."""
        self._points.append((step, elapsed_s - self._validation_s))
        if len(self._points) == UNMEASURED_STEPS:
            self._validation_before = self._validation_s
        measured = self._points[UNMEASURED_STEPS - 1 :]
        if len(measured) < 2:
            return None
        (first, _), (middle, since), (last, now) = measured[0], measured[-max(2, len(measured) // 4)], measured[-1]
        validation = (self._validation_s - self._validation_before) / (last - first)
        return (now - since) / (last - middle) + validation


@dataclass
class BudgetPlan:
    """A schedule planned over a time budget; see the module's docstring.

    Args:
        budget_s: The budget, in seconds of training (Lightning's ``Timer``: validation and checkpoints included).
        schedule: ``cosine`` or ``wsd``.
        warmup: A step count (int), or a fraction of the budget's time (float).
        decay_fraction: The share of the budget that ``wsd`` decays over.
        min_ratio: ``min_lr / learning_rate``: the multiplier at the last step.
        max_steps: A step count given as well (-1: none): the plan never goes beyond it.
    """

    budget_s: float
    schedule: str
    warmup: int | float
    decay_fraction: float
    min_ratio: float
    max_steps: int = -1
    # Measured
    s_per_step: float | None = None  # wall time per optimizer step, all costs included
    validation_s: float = 0.0  # the longest validation
    pause_s: float = 0.0  # the longest time between two steps outside validation: a checkpoint's writing
    elapsed_s: float = 0.0  # budget spent when last told
    # Planned
    total: int | None = None  # the steps planned (None until a first measurement)
    warmup_steps: int | None = None  # None while a warmup by time runs
    decay_start: int | None = None  # set when the plan is frozen
    noted: tuple[int, float] | None = None  # (steps, time spent) of the plan last logged
    shortened: tuple[int, float] | None = None  # (step, its lr factor): a frozen plan cut short from there

    def __post_init__(self) -> None:
        if isinstance(self.warmup, int) or self.warmup == 0:
            self.warmup_steps = int(self.warmup)
        # This process's latest steps' times (not saved), from its `UNMEASURED_STEPS`-th step on.
        self._recent: deque[float] = deque(maxlen=RECENT_STEPS)
        self._last: tuple[int, float] | None = None
        self._updates = 0

    @property
    def frozen(self) -> bool:
        return self.decay_start is not None

    def reserve_s(self) -> float:
        """Time kept back after the last step: a validation, two checkpoint writes (before and after it), and
        a step or `SLACK` of the decay's time, whichever is longer, for what the estimate misses."""
        slack = max(self.s_per_step or 0.0, SLACK * self.decay_fraction * self.budget_s)
        return self.validation_s + 2 * self.pause_s + slack

    def update(self, step: int, elapsed_s: float, s_per_step: float | None = None) -> bool:
        """Take in the state after an optimizer step: ``step`` steps done, ``elapsed_s`` of the budget spent,
        and a new measurement of the time per step (None: keep the last). True when the plan changed enough to
        say so: the first estimate, a change of more than `NOTEWORTHY_CHANGE` (not sooner than `NOTE_EVERY` of
        the budget after the last), or the freeze."""
        self._updates += 1
        if self._updates > UNMEASURED_STEPS and step > self._last[0]:
            self._recent.append((elapsed_s - self._last[1]) / (step - self._last[0]))
        self._last = (step, elapsed_s)
        self.elapsed_s = elapsed_s
        if self.warmup_steps is None and elapsed_s >= self.warmup * self.budget_s:
            self.warmup_steps = step
        if s_per_step is not None:
            self.s_per_step = s_per_step
        if self.frozen:
            return self._shorten(step, elapsed_s)
        if self.s_per_step is None:
            return False
        usable = self.budget_s - self.reserve_s()
        estimate = step + max(0, math.floor((usable - elapsed_s) / self.s_per_step))
        if self.max_steps > 0:
            estimate = min(estimate, self.max_steps)
        self.total = max(estimate, step + 1)
        decay_steps = round(self.decay_fraction * self.total)
        if elapsed_s >= (1 - self.decay_fraction) * usable or step >= self.total - decay_steps:
            self.decay_start = step
            if self.warmup_steps is None:
                self.warmup_steps = step
            return True
        if self.noted is not None:
            steps, at = self.noted
            if abs(self.total - steps) <= NOTEWORTHY_CHANGE * steps or elapsed_s - at < NOTE_EVERY * self.budget_s:
                return False
        self.noted = (self.total, elapsed_s)
        return True

    def _shorten(self, step: int, elapsed_s: float) -> bool:
        """Cut a frozen plan to the steps that still fit before ``max_time`` stops the run (the final validation
        may go past it, as it may in any budgeted run); True when it was cut. The rate goes on from the last
        step's down to the minimum at the new last step."""
        # The pace of the latest steps: a slowdown is seen within a few steps (a median: a validation among
        # them does not count), where the measured time per step follows it over many.
        pace = max(self.s_per_step, statistics.median(self._recent)) if len(self._recent) >= 5 else self.s_per_step
        fits = step + max(0, math.floor((self.budget_s - pace - elapsed_s) / pace))
        if fits >= self.total:
            return False
        factor = self.lr_factor(step - 1)  # the rate of the step just taken
        self.total, self.shortened = max(fits, step + 1), (step, factor)
        if self.noted is not None and elapsed_s - self.noted[1] < NOTE_EVERY * self.budget_s:
            return False
        self.noted = (self.total, elapsed_s)
        return True

    def lr_factor(self, step: int) -> float:
        """The learning-rate multiplier of optimizer step ``step`` under the plan as it stands."""
        if self.shortened is not None and step >= self.shortened[0]:  # a straight line to the minimum
            start, factor = self.shortened
            return factor - (factor - self.min_ratio) * (step + 1 - start) / max(1, self.total - start)
        if self.warmup_steps is None:  # a warmup by time, still running
            return min(1.0, self.elapsed_s / (self.warmup * self.budget_s))
        if step < self.warmup_steps:
            return lr_factor(step, self.warmup_steps, self.warmup_steps, self.min_ratio)  # its linear warmup
        if self.total is None:  # not measured yet: the peak, where both schedules start
            return 1.0
        if self.schedule != "wsd":
            return lr_factor(step, self.warmup_steps, self.total, self.min_ratio)
        if self.decay_start is None:
            return 1.0
        decay_fraction = (self.total - self.decay_start) / self.total  # wsd_factor's decay then starts there
        return wsd_factor(step, self.warmup_steps, self.total, self.min_ratio, decay_fraction)

    def describe(self) -> str:
        """One line: ``10:00 budget: ~612 steps at 0.93 s/step, decay from step 490``."""
        minutes, seconds = divmod(round(self.budget_s), 60)
        head = f"{minutes}:{seconds:02d} budget"
        if self.total is None or self.s_per_step is None:
            return f"{head}: measuring the time per step"
        steps = f"{head}: {'' if self.frozen else '~'}{self.total} steps at {self.s_per_step:.3g} s/step"
        if self.shortened is not None:
            return f"{steps}, cut short from step {self.shortened[0]}: the steps slowed down"
        if self.frozen:
            what = "decay" if self.schedule == "wsd" else "plan frozen"
            return f"{steps}, {what} from step {self.decay_start}"
        return f"{steps}, re-estimated until {1 - self.decay_fraction:.0%} of the budget"

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take a saved plan's measurements and plan; the budget, the cap and the schedule's settings stay this
        run's (the config's)."""
        kept = {"budget_s", "schedule", "warmup", "decay_fraction", "min_ratio", "max_steps"}
        for field in fields(self):
            if field.name not in kept and field.name in state:
                setattr(self, field.name, state[field.name])
