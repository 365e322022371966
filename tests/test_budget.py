"""Training to a time budget (gptlit.training.budget): the plan on a fake clock, and runs given trainer.max_time."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import OPTIM, run_cli, scalars, write_config

from gptlit.training import budget
from gptlit.training.budget import UNMEASURED_STEPS, BudgetPlan, StepRate
from gptlit.training.optim import wsd_factor


def plan_of(**settings) -> BudgetPlan:
    defaults = dict(budget_s=100.0, schedule="wsd", warmup=0.05, decay_fraction=0.2, min_ratio=0.1)
    return BudgetPlan(**{**defaults, **settings})


def run_on_fake_clock(plan: BudgetPlan, step_s, validate_every: int = 0, validation_s: float = 0.0):
    """Drive ``plan`` as TimeBudget does, on a clock that advances ``step_s(step)`` per step and ``validation_s``
    every ``validate_every`` steps; stop at the planned step. Returns (steps, time spent, [lr factor per step]);
    the clock after each step is in ``plan.clocks``."""
    clock, step, factors, rate = 0.0, 0, [], StepRate()
    plan.clocks = [0.0]
    while plan.total is None or step < plan.total:
        factors.append(plan.lr_factor(step))
        clock += step_s(step) + (3.0 if step == 0 else 0.0)  # the first step pays for warm-up costs
        step += 1
        if validate_every and step % validate_every == 0:
            clock += validation_s
            plan.validation_s = validation_s
            rate.add_validation(validation_s)
        plan.update(step, clock, rate.record(step, clock))
        plan.clocks.append(clock)
        assert step < 10_000
    return step, clock + plan.validation_s, factors


def test_a_steady_run_fills_its_budget_and_ends_its_decay_at_the_minimum() -> None:
    plan = plan_of(budget_s=100.0)
    steps, spent, factors = run_on_fake_clock(plan, lambda step: 0.1, validate_every=50, validation_s=1.0)
    assert plan.frozen
    # Inside the budget but for one validation (validations fall unevenly between the steps), not far inside it.
    assert 100.0 - 2 * plan.reserve_s() <= spent <= 100.0 + plan.validation_s
    assert factors[-1] == pytest.approx(0.1)  # min_lr at the last step
    # Warmup by time (5 s: 3 s of the first step, then 0.1 s steps), the peak, then a linear decay.
    assert plan.warmup_steps == 21 and factors[0] == 0.0
    assert all(a < b for a, b in itertools.pairwise(factors[1:21])) and factors[21] == 1.0
    decay = factors[plan.decay_start :]
    assert factors[21 : plan.decay_start] == [1.0] * (plan.decay_start - 21)
    assert all(a > b for a, b in itertools.pairwise(decay))
    # The decay began when 80% of the budget left after the reserve had passed: a fifth of the time decays.
    decay_s = plan.clocks[steps] - plan.clocks[plan.decay_start]
    assert decay_s == pytest.approx(0.2 * (100.0 - plan.reserve_s()), abs=plan.validation_s)


def test_a_machine_that_slows_down_plans_fewer_steps_before_the_decay() -> None:
    steady, slowed = plan_of(), plan_of()
    run_on_fake_clock(steady, lambda step: 0.1)
    run_on_fake_clock(slowed, lambda step: 0.1 if step < 200 else 0.3)
    assert slowed.total < steady.total * 0.6
    assert slowed.elapsed_s + slowed.validation_s <= 100.0


@pytest.mark.parametrize("schedule", ["wsd", "cosine"])
def test_a_machine_that_slows_down_in_the_decay_ends_it_early_at_the_minimum(schedule) -> None:
    # Another job takes the CPU after the freeze: steps take 3x as long. The plan is cut to what fits, and the rate
    # goes on down from where it stood to min_lr at the new last step, inside the budget.
    steady, slowed = plan_of(schedule=schedule), plan_of(schedule=schedule)
    steady_factors = run_on_fake_clock(steady, lambda step: 0.1)[2]
    cut_at = steady.decay_start + 20
    steps, spent, factors = run_on_fake_clock(slowed, lambda step: 0.1 if step < cut_at else 0.3)
    assert slowed.decay_start == steady.decay_start and slowed.shortened is not None
    assert steps == slowed.total < steady.total and spent <= 100.0 + slowed.validation_s
    assert factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(factors[slowed.decay_start :]))
    # Until the machine slowed, the rate is the steady run's; then a steeper line, with no jump (no step drops
    # more than 2% of the decay's range).
    assert factors[:cut_at] == steady_factors[:cut_at]
    assert max(a - b for a, b in itertools.pairwise(factors[cut_at - 1 :])) < 0.02 * (1 - 0.1)
    assert "cut short from step" in slowed.describe()


def test_cosine_is_laid_out_over_the_estimate_and_frozen_with_it() -> None:
    plan = plan_of(schedule="cosine", warmup=10)
    steps, spent, factors = run_on_fake_clock(plan, lambda step: 0.1)
    assert spent <= 100.0 and plan.frozen and steps == plan.total
    assert factors[:10] == pytest.approx([(s + 1) / 11 for s in range(10)])  # a warmup given in steps
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in itertools.pairwise(factors[UNMEASURED_STEPS + 10 :]))


def test_max_steps_that_fit_give_the_step_count_schedule() -> None:
    plan = plan_of(warmup=4, max_steps=60)
    steps, spent, factors = run_on_fake_clock(plan, lambda step: 0.1)
    assert steps == 60 and spent < 20
    assert factors == pytest.approx([wsd_factor(s, 4, 60, 0.1, 0.2) for s in range(60)])


def test_the_plan_survives_a_checkpoint_round_trip() -> None:
    plan = plan_of()
    clock = 0.0
    for step in range(1, 900):
        clock += 0.1
        plan.update(step, clock, 0.1)
        if plan.frozen:
            break
    restored = plan_of()  # the same config, a fresh process
    restored.load_state_dict(plan.state_dict())
    assert restored == plan
    assert [restored.lr_factor(s) for s in range(plan.total)] == [plan.lr_factor(s) for s in range(plan.total)]
    # Another budget in the config is this run's budget; what was measured and planned is kept.
    longer = plan_of(budget_s=200.0)
    longer.load_state_dict(plan.state_dict())
    assert longer.budget_s == 200.0 and longer.decay_start == plan.decay_start and longer.total == plan.total


def test_the_plan_reads_in_one_line() -> None:
    plan = plan_of(budget_s=600.0)
    assert plan.describe() == "10:00 budget: measuring the time per step"
    plan.update(20, 20.0, 0.93)
    assert plan.describe() == "10:00 budget: ~637 steps at 0.93 s/step, re-estimated until 80% of the budget"
    plan.update(501, 480.0, 0.93)
    assert plan.describe() == "10:00 budget: 623 steps at 0.93 s/step, decay from step 501"


# Runs given trainer.max_time ----------------------------------------------------------------------------------

BUDGET_S = 15


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch):
    """Training on one thread: on a shared, busy CPU two threads waiting on each other make a tiny model's step
    take seconds, and a budget of seconds would hold a handful of steps. The plan keeps 30% of the decay's time
    free (5% otherwise): a busy machine's step times vary by that much within seconds."""
    monkeypatch.setattr(budget, "SLACK", 0.3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {**os.environ, "OMP_NUM_THREADS": "1"}
    torch.set_num_threads(threads)


def budget_config(workdir: Path, name: str, **trainer) -> Path:
    """The tiny model of test_train, given ``BUDGET_S`` seconds and no step count, decaying over half the budget
    (so that a stop lands inside the decay whatever the machine's speed), a checkpoint every step."""
    path = write_config(workdir, name=name, max_steps=-1, max_time={"seconds": BUDGET_S}, **trainer)
    config = yaml.safe_load(path.read_text())
    config["model"].update(schedule="wsd", warmup=0.05, decay_fraction=0.5)
    config["checkpoint"]["every_n_train_steps"] = 1
    path.write_text(yaml.safe_dump(config))
    return path


def saved_budget(ckpt: Path) -> tuple[dict, float, int]:
    """(the plan, the budget's time spent, global_step) that a checkpoint holds."""
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    plan, timer = saved["callbacks"]["TimeBudget"]["plan"], saved["callbacks"]["Timer"]
    return plan, timer["time_elapsed"]["train"], saved["global_step"]


def assert_ended_inside_the_budget_with_the_decay_done(run: Path, budget_s: float = BUDGET_S) -> dict:
    plan, spent, step = saved_budget(run / "checkpoints" / "last.ckpt")
    assert plan["decay_start"] is not None and step == plan["total"] > plan["decay_start"]
    # The last step inside the budget (the plan's end, before Lightning's max_time stop), then at most one
    # validation and its checkpoint writes beyond it.
    assert plan["elapsed_s"] <= budget_s
    assert spent <= budget_s + plan["validation_s"] + 2 * plan["pause_s"]
    logged = scalars(run)
    lrs = logged["train/lr/no_decay"]
    assert [s for s, _ in lrs] == list(range(step))  # one curve, every step once
    assert lrs[-1][1] == pytest.approx(OPTIM["min_lr"], rel=1e-5)  # the last step at min_lr
    decay = [lr for s, lr in lrs if s >= plan["decay_start"]]
    assert all(a > b for a, b in itertools.pairwise(decay))
    assert logged["val/loss"][-1][0] == step - 1  # a final validation, after the last step
    return plan


def assert_the_same_plan(resumed: dict, plan: dict, step: int) -> None:
    """The resumed run followed the saved plan: not re-planned; cut short only if its steps then slowed down so
    much that max_time would have stopped it mid-decay (a busy machine), and only after the resumed step."""
    assert resumed["decay_start"] == plan["decay_start"]
    if resumed["shortened"] is None:
        assert resumed["total"] == plan["total"]
    else:
        assert resumed["total"] < plan["total"] and resumed["shortened"][0] > step


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 64], ids=["windows-of-1", "many-epochs"])
def test_a_budgeted_run_ends_inside_its_budget_with_the_decay_done(
    workdir: Path, one_thread, caplog, batch_size: int
) -> None:
    record = f'{{"class_path": "probes.RecordBarTotal", "init_args": {{"path": "{workdir / "bar.json"}"}}}}'
    config = budget_config(workdir, "budget", enable_progress_bar=True)
    run_cli("fit", "--config", str(config), "--data.batch_size", str(batch_size), f"--trainer.callbacks+={record}")
    plan = assert_ended_inside_the_budget_with_the_decay_done(workdir / "lightning_logs" / "budget")
    assert f"0:{BUDGET_S} budget: {plan['total']} steps at " in caplog.text  # the frozen plan, logged
    # The progress bar counts the run's steps to the planned total, over one epoch or several (windows of 64).
    bar = json.loads((workdir / "bar.json").read_text())
    assert bar == {"total": plan["total"], "completed": plan["total"], "epochs": bar["epochs"]}
    assert bar["epochs"] > 1 or batch_size == 1


@pytest.mark.slow
def test_ctrl_c_in_the_decay_resumes_the_same_plan_with_the_remaining_time(workdir: Path, one_thread) -> None:
    stop = '{"class_path": "probes.SignalWhenDecaying", "init_args": {"name": "SIGINT"}}'
    with pytest.raises(SystemExit) as stopped:
        run_cli("fit", "--config", str(budget_config(workdir, "cut")), f"--trainer.callbacks+={stop}")
    assert stopped.value.code == 130
    run = workdir / "lightning_logs" / "cut"
    plan, spent, step = saved_budget(run / "checkpoints" / "last.ckpt")
    assert plan["decay_start"] < step < plan["total"]

    run_cli("fit", "--ckpt_path", "last")

    resumed = assert_ended_inside_the_budget_with_the_decay_done(run)
    assert_the_same_plan(resumed, plan, step)
    assert saved_budget(run / "checkpoints" / "last.ckpt")[1] > spent  # the clock went on from the time spent


@pytest.mark.slow
def test_kill_9_in_the_decay_resumes_the_same_plan(workdir: Path, one_thread: dict) -> None:
    kill = '{"class_path": "probes.SignalWhenDecaying", "init_args": {"name": "SIGKILL"}}'
    tests = str(Path(__file__).parent)
    env = {**one_thread, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    args = ["fit", "--config", str(budget_config(workdir, "killed")), f"--trainer.callbacks+={kill}"]
    killed = subprocess.run([sys.executable, "-m", "gptlit", *args], cwd=workdir, env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = workdir / "lightning_logs" / "killed"
    plan, spent, step = saved_budget(run / "checkpoints" / "last.ckpt")
    assert plan["decay_start"] <= step < plan["total"]

    run_cli("fit", "--ckpt_path", "last")

    resumed = assert_ended_inside_the_budget_with_the_decay_done(run)
    assert_the_same_plan(resumed, plan, step)
    assert saved_budget(run / "checkpoints" / "last.ckpt")[1] > spent


@pytest.mark.slow
def test_a_longer_budget_extends_a_finished_run_from_its_stable_checkpoint(workdir: Path, one_thread, capsys) -> None:
    run_cli("fit", "--config", str(budget_config(workdir, "extended")))
    run = workdir / "lightning_logs" / "extended"
    first = assert_ended_inside_the_budget_with_the_decay_done(run)
    # The command fit prints at its end gives twice the budget, from stable.ckpt.
    extend = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("  extend:"))
    assert extend.endswith(f"--ckpt_path stable --run_name extended --trainer.max_time 00:00:00:{2 * BUDGET_S}")
    stable, _, at = saved_budget(run / "checkpoints" / "stable.ckpt")
    assert at == first["decay_start"] == stable["decay_start"]  # the state as the decay started

    # Another budget from last (past the decay's start) would lay the decay anew mid-way: refused in one line.
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    longer = f"--trainer.max_time={json.dumps({'seconds': 2 * BUDGET_S})}"
    with pytest.raises(SystemExit) as refused:
        run_cli("fit", "--ckpt_path", "last", longer)
    assert refused.value.code == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "past the start of its learning-rate decay" in message and "--ckpt_path stable" in message
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before

    # From stable: a plan made anew over the longer budget, one decay at its end.
    run_cli("fit", "--ckpt_path", "stable", longer)
    extended = assert_ended_inside_the_budget_with_the_decay_done(run, budget_s=2 * BUDGET_S)
    assert extended["decay_start"] > first["decay_start"] and extended["total"] > first["total"]
