"""Resuming a run: wherever it has moved, from whichever config spelling, with last.ckpt its newest state."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from helpers import MODEL, OPTIM, params, run_cli, scalars, write_config
from torch.utils.data import DataLoader

from gptlit.errors import UsageError
from gptlit.model.config import GPTConfig
from gptlit.training.checkpoint_callbacks import BestCheckpoint
from gptlit.training.module import GPTLitModule
from gptlit.training.optim import lr_factor, wsd_factor
from gptlit.training.runs import check_decay_not_begun


def checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def step_of(ckpt: Path) -> int:
    return torch.load(ckpt, weights_only=True)["global_step"]


def test_a_moved_run_resumes_and_resumes_again_from_its_latest_step(workdir: Path) -> None:
    """Fit 20 steps, move the whole root, resume to 30 and to 40: the same weights as 40 steps in one go.

    A constant learning rate, so that extending max_steps changes no schedule.
    """
    config = write_config(workdir, max_steps=40, val_check_interval=4)
    config.write_text(config.read_text().replace("min_lr: 0.0003", "min_lr: 0.003").replace("warmup: 4", "warmup: 0"))
    run_cli("fit", "--config", str(config), "--run_name", "straight", "--trainer.default_root_dir", "first")
    run_cli("fit", "--config", str(config), "--trainer.default_root_dir", "first", "--trainer.max_steps", "20")
    shutil.move(workdir / "first", workdir / "moved")
    for max_steps in ("30", "40"):
        run_cli("fit", "--ckpt_path", "last", "--trainer.default_root_dir", "moved", "--trainer.max_steps", max_steps)

    run = workdir / "moved" / "lightning_logs" / "run"
    assert checkpoints(run) == ["best.ckpt", "last.ckpt"]  # never a last-v1.ckpt
    assert step_of(run / "checkpoints" / "last.ckpt") == 40
    straight = params(workdir / "moved" / "lightning_logs" / "straight" / "checkpoints" / "last.ckpt")
    resumed = params(run / "checkpoints" / "last.ckpt")
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert [step for step, _ in scalars(run)["train/loss"]] == list(range(40))

    # best.ckpt holds the lowest validation loss of the whole run, and its state names the new place.
    val = scalars(run)["val/loss"]
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    (state,) = [s for key, s in best["callbacks"].items() if key.startswith("ModelCheckpoint")]
    assert float(state["best_model_score"]) == pytest.approx(min(v for _, v in val))
    assert Path(state["best_model_path"]).resolve() == run / "checkpoints" / "best.ckpt"
    # last.ckpt, saved again after the validation of its step, holds the best score that validation gave.
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    (state,) = [s for key, s in last["callbacks"].items() if key.startswith("ModelCheckpoint")]
    assert float(state["best_model_score"]) == pytest.approx(min(v for _, v in val))


def test_a_moved_best_checkpoint_keeps_its_score() -> None:
    """Lightning forgets the best score when the directory changed: a worse model would replace best.ckpt."""
    saved = BestCheckpoint(monitor="val/loss")
    saved.dirpath, saved.best_model_score = "/old/run/checkpoints", torch.tensor(1.5)
    saved.best_model_path = saved.kth_best_model_path = "/old/run/checkpoints/best.ckpt"
    saved.best_k_models = {saved.best_model_path: torch.tensor(1.5)}
    moved = BestCheckpoint(monitor="val/loss")
    moved.dirpath = "/new/place/run/checkpoints"
    moved.load_state_dict(saved.state_dict())
    assert moved.best_model_score == torch.tensor(1.5)
    assert moved.best_model_path == moved.kth_best_model_path == "/new/place/run/checkpoints/best.ckpt"
    assert moved.best_k_models == {"/new/place/run/checkpoints/best.ckpt": torch.tensor(1.5)}
    assert moved.state_key == saved.state_key and moved.state_key.startswith("ModelCheckpoint{")  # as 0.1.0 saved it


@pytest.mark.parametrize("spelling", [["-c", "{}"], ["--config", "{}"], ["--config={}"]], ids=" ".join)
def test_every_spelling_of_config_resumes_that_run(workdir: Path, spelling: list[str]) -> None:
    """``fit -c <run>/config.yaml --ckpt_path last`` resumes that run, not the most recently written one."""
    run_cli("fit", "--config", str(write_config(workdir, name="alpha", max_steps=4)))
    run_cli("fit", "--config", str(write_config(workdir, name="beta", max_steps=4)))  # written last
    alpha = workdir / "lightning_logs" / "alpha"
    args = [part.format(alpha / "config.yaml") for part in spelling]
    run_cli("fit", *args, "--ckpt_path", "last", "--trainer.max_steps", "6")
    assert step_of(alpha / "checkpoints" / "last.ckpt") == 6
    assert step_of(workdir / "lightning_logs" / "beta" / "checkpoints" / "last.ckpt") == 4


def test_ckpt_path_last_resumes_the_named_run_and_a_copied_run_resumes_in_its_own_directory(workdir: Path) -> None:
    run_cli("fit", "--config", str(write_config(workdir, name="alpha", max_steps=4)))
    run_cli("fit", "--config", str(write_config(workdir, name="beta", max_steps=4)))  # the latest
    runs = workdir / "lightning_logs"
    run_cli("fit", "--ckpt_path", "last", "--run_name", "alpha", "--trainer.max_steps", "6")
    assert step_of(runs / "alpha" / "checkpoints" / "last.ckpt") == 6
    assert step_of(runs / "beta" / "checkpoints" / "last.ckpt") == 4
    shutil.copytree(runs / "beta", runs / "beta-fork")
    run_cli("fit", "--ckpt_path", str(runs / "beta-fork" / "checkpoints" / "last.ckpt"), "--trainer.max_steps", "8")
    assert step_of(runs / "beta-fork" / "checkpoints" / "last.ckpt") == 8
    assert step_of(runs / "beta" / "checkpoints" / "last.ckpt") == 4  # the original is left as it was


def test_resume_and_extend_with_the_starting_config_keeps_the_runs_own_settings(workdir: Path, capsys) -> None:
    """The README's ``fit --config <x>.yaml --ckpt_path last --trainer.max_steps N`` after a run started with
    ``--data.source <local file>``: the run's saved config.yaml is the base, not the file's hub source."""
    config = write_config(workdir, max_steps=4)
    config.write_text(config.read_text().replace(str(workdir / "stories.txt"), "roneneldan/TinyStories"))
    run_cli("fit", "--config", str(config), "--data.source", "stories.txt", "--model.learning_rate", "0.002")
    capsys.readouterr()
    run_cli("fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "6")
    run = workdir / "lightning_logs" / "run"
    assert step_of(run / "checkpoints" / "last.ckpt") == 6
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["data"]["source"], saved["model"]["learning_rate"]) == ("stories.txt", 0.002)
    assert saved["trainer"]["max_steps"] == 6
    line = capsys.readouterr().err.splitlines()[0]
    assert line == (
        f"gptlit: run 'run' uses its saved lightning_logs/run/config.yaml ({config} names the run; its settings "
        "are not read); changed on the command line: trainer.max_steps"
    )


def lrs(run: Path, group: str) -> list[float]:
    """The logged learning rate of a parameter group, step by step (each step once)."""
    logged = scalars(run)[f"train/lr/{group}"]
    assert [step for step, _ in logged] == list(range(len(logged)))
    return [value for _, value in logged]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_resume_with_lower_rates_takes_them_from_the_resumed_step(
    workdir: Path, capsys: pytest.CaptureFixture, optimizer: str
) -> None:
    """The recovery from a loss spike: stop, lower the rates, resume. The schedule goes on with the new peaks."""
    config = write_config(workdir, max_steps=8)
    stop = '{"class_path": "probes.InterruptAt", "init_args": {"step": 4}}'
    with pytest.raises(SystemExit):
        run_cli("fit", "--config", str(config), "--model.optimizer", optimizer, f"--trainer.callbacks+={stop}")
    capsys.readouterr()
    lower = ["--model.learning_rate", "0.001", "--model.muon_lr", "0.01", "--model.weight_decay", "0.05"]
    run_cli("fit", "--ckpt_path", "last", *lower)

    run = workdir / "lightning_logs" / "run"
    before = [OPTIM["learning_rate"] * lr_factor(s, 4, 8, 0.1) for s in range(4)]
    after = [0.001 * lr_factor(s, 4, 8, OPTIM["min_lr"] / 0.001) for s in range(4, 8)]
    assert lrs(run, "no_decay") == pytest.approx(before + after, rel=1e-5)
    if optimizer == "muon":
        muon = [0.02 * lr_factor(s, 4, 8, 0.1) for s in range(4)] + [
            0.01 * lr_factor(s, 4, 8, 0.3) for s in range(4, 8)
        ]
        assert lrs(run, "muon") == pytest.approx(muon, rel=1e-5)
    groups = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["optimizer_states"][0]["param_groups"]
    peaks = {"muon": 0.01}
    assert [g["initial_lr"] for g in groups] == [peaks.get(g["name"], 0.001) for g in groups]
    decays = {"muon": 0.0, "decay": 0.05, "head": 0.05}
    assert [g["weight_decay"] for g in groups] == [decays.get(g["name"], 0.0) for g in groups]
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gptlit: learning_rate")]
    assert lines == ["gptlit: learning_rate 0.003 → 0.001, muon_lr 0.02 → 0.01, weight_decay 0.1 → 0.05 from step 4"]
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert (saved["learning_rate"], saved["muon_lr"], saved["weight_decay"]) == (0.001, 0.01, 0.05)


def test_a_finished_wsd_run_extends_from_its_stable_checkpoint_and_decays_once(
    workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    """16 steps decaying over the last 8; extended to 24 from stable.ckpt: the peak until step 12, one decay to the
    minimum at step 23. Every fit ends with a validation of its last step (val_check_interval 6 divides neither)."""
    config = write_config(workdir, max_steps=16, val_check_interval=6)
    run_cli("fit", "--config", str(config), "--model.schedule", "wsd", "--model.decay_fraction", "0.5")
    run, peak = workdir / "lightning_logs" / "run", OPTIM["learning_rate"]
    assert step_of(run / "checkpoints" / "stable.ckpt") == 8  # the state before the first step below the peak
    assert [step for step, _ in scalars(run)["val/loss"]] == [5, 11, 15]
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["gptlit"]["metrics"]["val/loss"] == pytest.approx(scalars(run)["val/loss"][-1][1])

    # From last.ckpt, past the decay's start: refused in one line, and nothing changes.
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        run_cli("fit", "--ckpt_path", "last", "--trainer.max_steps", "24")
    assert refused.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gptlit: error:")]
    (line,) = errors
    assert "past the start of its learning-rate decay (step 8 of 16)" in line
    assert "--ckpt_path stable --trainer.max_steps 24" in line
    assert step_of(run / "checkpoints" / "last.ckpt") == 16
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_steps"] == 16

    run_cli("fit", "--ckpt_path", "stable", "--trainer.max_steps", "24")
    expected = [peak * wsd_factor(s, 4, 24, 0.1, 0.5) for s in range(24)]
    logged = lrs(run, "no_decay")
    assert logged == pytest.approx(expected, rel=1e-5)
    assert logged[8:12] == pytest.approx([peak] * 4) and logged[23] == pytest.approx(OPTIM["min_lr"])
    assert step_of(run / "checkpoints" / "stable.ckpt") == 12
    assert step_of(run / "checkpoints" / "last.ckpt") == 24
    assert [step for step, _ in scalars(run)["val/loss"]] == [5, 11, 17, 23]
    assert [step for step, _ in scalars(run)["train/loss"]] == list(range(24))


def test_extending_past_a_begun_decay_without_a_stable_checkpoint_says_so(tmp_path: Path) -> None:
    checkpoint = {
        "global_step": 36,
        "hyper_parameters": {"schedule": "wsd", "warmup": 0.1, "decay_fraction": 0.2},
        "gptlit": {"total_steps": 40},
    }
    last = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(UsageError, match=r"step 32 of 40.*there is no \S+stable\.ckpt.*--trainer\.max_steps 40"):
        check_decay_not_begun(checkpoint, "wsd", 80, last, "last")
    check_decay_not_begun(checkpoint, "wsd", 40, last, "last")  # a plain resume
    check_decay_not_begun({**checkpoint, "global_step": 32}, "wsd", 80, last, "last")  # at the decay's start
    check_decay_not_begun(checkpoint, "cosine", 80, last, "last")  # another schedule now: the user's choice


def test_a_checkpoint_of_another_shape_is_refused_alike_by_the_cli_and_by_lightnings_own_load(
    trained: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command line checks before anything starts, a Trainer given the checkpoint as it restores it: one
    check, one UsageError, one message."""
    last = str(trained / "lightning_logs" / "run" / "checkpoints" / "last.ckpt")
    expected = (
        f"{last} holds a model with embed_dim=32, but the config asks for embed_dim=64; "
        "resume with the run's own config, or set model.config.embed_dim: 32"
    )
    monkeypatch.chdir(trained)
    with pytest.raises(SystemExit) as failed:
        run_cli("validate", "--config", "run.yaml", "--ckpt_path", last, "--model.config.embed_dim", "64")
    assert failed.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"gptlit: error: {expected}"

    module = GPTLitModule(config=GPTConfig(**{**MODEL, "embed_dim": 64}, vocab_size=320))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    batches = DataLoader([(torch.zeros(32, dtype=torch.long), torch.zeros(32, dtype=torch.long))])
    with pytest.raises(UsageError) as refused:
        trainer.validate(module, dataloaders=batches, ckpt_path=last, weights_only=True)
    assert str(refused.value) == expected
