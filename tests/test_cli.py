"""The command line: shipped configs, run directories, and clear one-line errors that lose nothing."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import run_cli, write_config
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from gptlit.cli.main import GPTLitCLI, make_cli
from gptlit.cli.run_config import is_rank_zero
from gptlit.errors import DataError
from gptlit.model.config import MLPS, NORMS
from gptlit.model.gpt import Block
from gptlit.training.module import GPTLitModule

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_shipped_config_parses_and_instantiates(config: Path, tmp_path: Path) -> None:
    text = config.read_text()
    assert "vocab_size" not in text.split("data:")[0], "vocab_size is linked from data; never set it under model"
    cli = make_cli(["--config", str(config), "--data.data_dir", str(tmp_path / "data")], run=False)
    assert isinstance(cli.model, GPTLitModule)
    assert cli.model.config.vocab_size == cli.datamodule.vocab_size  # the link
    assert cli.datamodule.block_size == cli.model.config.block_size  # the other link
    assert cli.model.config.embed_dim % cli.model.config.n_heads == 0


def test_readme_fsdp_strategy_wraps_each_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FSDP needs CUDA, so here only the README's YAML is checked: it builds Lightning's FSDPStrategy with a
    wrap policy of gptlit's Block, up to the Trainer (which would refuse a CPU)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (block,) = [b.split("\n", 1)[1] for b in readme.split("```yaml")[1:] if "FSDPStrategy" in b]
    (tmp_path / "fsdp.yaml").write_text(block.split("```")[0])
    monkeypatch.setattr(GPTLitCLI, "instantiate_trainer", lambda self, **kwargs: None)
    small = Path(__file__).parents[1] / "configs" / "small.yaml"
    args = ["--config", str(small), "--config", str(tmp_path / "fsdp.yaml"), "--data.data_dir", str(tmp_path)]
    cli = make_cli(args, run=False)
    assert cli.config.trainer.strategy.init_args.auto_wrap_policy == {Block}
    strategy = cli.config_init.trainer.strategy
    assert isinstance(strategy, FSDPStrategy) and isinstance(strategy.kwargs["auto_wrap_policy"], ModuleWrapPolicy)


@pytest.mark.parametrize(
    ("environment", "first"),
    [
        ({}, True),
        ({"LOCAL_RANK": "1"}, False),  # a process Lightning's own launcher started
        ({"RANK": "0", "LOCAL_RANK": "0"}, True),  # torchrun
        ({"RANK": "5", "LOCAL_RANK": "1"}, False),
        ({"SLURM_PROCID": "3"}, False),  # srun starts every task itself
        ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),  # the first process of the second machine
    ],
)
def test_only_the_first_process_judges_run_directories(monkeypatch, environment: dict, first: bool) -> None:
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert is_rank_zero() is first


def _error_line(capsys: pytest.CaptureFixture) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1]


def test_a_second_fresh_run_of_the_same_name_is_refused_and_loses_nothing(workdir: Path, capsys) -> None:
    config = write_config(workdir, max_steps=4)
    run_cli("fit", "--config", str(config))
    last = workdir / "lightning_logs" / "run" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    with pytest.raises(SystemExit) as failed:
        run_cli("fit", "--config", str(config))
    assert failed.value.code == 1
    line = _error_line(capsys)
    assert "already exists" in line and "--ckpt_path last" in line
    assert last.read_bytes() == before
    # --overwrite replaces it on purpose; --run_name starts another.
    run_cli("fit", "--config", str(config), "--run_name", "second")
    assert (workdir / "lightning_logs" / "second" / "checkpoints" / "last.ckpt").is_file()


def test_resuming_into_another_model_shape_is_refused(workdir: Path, capsys) -> None:
    config = write_config(workdir, max_steps=4)
    run_cli("fit", "--config", str(config))
    with pytest.raises(SystemExit) as failed:
        run_cli(
            "fit",
            "--config",
            str(config),
            "--ckpt_path",
            "last",
            "--model.config.embed_dim",
            "64",
            "--trainer.max_steps",
            "8",
        )
    assert failed.value.code == 1
    assert "embed_dim=32" in _error_line(capsys)
    ckpt = torch.load(workdir / "lightning_logs" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4


def test_resuming_with_another_optimizer_is_refused(workdir: Path, capsys) -> None:
    run_cli("fit", "--config", str(write_config(workdir, max_steps=4)))
    with pytest.raises(SystemExit) as failed:
        run_cli("fit", "--ckpt_path", "last", "--model.optimizer", "muon", "--trainer.max_steps", "6")
    assert failed.value.code == 1
    assert "trained with model.optimizer adamw" in _error_line(capsys)


def test_a_checkpoint_file_without_config_resumes_its_run(workdir: Path) -> None:
    run_cli("fit", "--config", str(write_config(workdir, max_steps=4)))
    last = workdir / "lightning_logs" / "run" / "checkpoints" / "last.ckpt"
    run_cli("fit", "--ckpt_path", str(last), "--trainer.max_steps", "6")  # the run's config.yaml, not the defaults
    assert torch.load(last, weights_only=True)["global_step"] == 6
    assert sorted(p.name for p in (workdir / "lightning_logs").iterdir()) == ["run"]


def test_resuming_with_a_larger_max_steps_continues_the_run(workdir: Path) -> None:
    config = write_config(workdir, max_steps=4)
    run_cli("fit", "--config", str(config))
    run_cli("fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "6")
    ckpt = torch.load(workdir / "lightning_logs" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6


def test_prepare_subcommand_prepares_only_the_data(workdir: Path) -> None:
    config = write_config(workdir)
    run_cli("prepare", "--config", str(config))
    assert (workdir / "data" / "meta.json").is_file()
    assert not (workdir / "lightning_logs").exists()


def test_python_dash_m_gptlit_help_lists_the_documented_options() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gptlit", "fit", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for option in (
        "--model.config.embed_dim",
        "--model.config.mlp",
        "--data.source",
        "--data.config_name",
        "--data.text_field",
        "--data.train_split",
        "--data.val_split",
        "sample-10BT",  # config_name's help, from the data module's docstring
        "--run_name",
        "--checkpoint.every_n_train_steps",
    ):
        assert option in out
    # The variants' choices, from the one list of their names.
    assert f"--model.config.mlp {{{','.join(MLPS)}}}" in out and "geglu" in MLPS
    assert f"--model.config.norm_type {{{','.join(NORMS)}}}" in out


def test_a_bug_keeps_its_traceback_and_gptlit_errors_are_one_line(monkeypatch, capsys) -> None:
    """gptlit's own errors are one line and exit 1; anything else (a bug, here in an edited model) propagates."""

    def broken(args):
        raise ValueError("an edit of the model broke it")

    monkeypatch.setattr("gptlit.cli.main._run", broken)
    with pytest.raises(ValueError, match="an edit of the model broke it"):
        run_cli("fit")

    def refuses(args):
        raise DataError("stories.txt: no such file or directory; check --data.source")

    monkeypatch.setattr("gptlit.cli.main._run", refuses)
    with pytest.raises(SystemExit) as failed:
        run_cli("fit")
    assert failed.value.code == 1
    assert capsys.readouterr().err == "gptlit: error: stories.txt: no such file or directory; check --data.source\n"


def test_settings_the_trainer_refuses_are_one_line(workdir: Path, capsys) -> None:
    config = write_config(workdir, max_steps=4)
    with pytest.raises(SystemExit) as failed:
        run_cli("fit", "--config", str(config), "--trainer.strategy", "fsdp", "--trainer.devices", "2")
    assert failed.value.code == 2
    line = _error_line(capsys)
    assert line.startswith("gptlit: error: trainer: The strategy `fsdp` requires a GPU accelerator")


def test_a_run_that_saved_no_checkpoint_starts_over_and_keeps_its_logs(workdir: Path, capsys) -> None:
    """A run killed before its first checkpoint has nothing to resume: a fresh fit starts it over."""
    config = write_config(workdir, max_steps=4)
    run_cli("fit", "--config", str(config))
    run = workdir / "lightning_logs" / "run"
    shutil.rmtree(run / "checkpoints")  # as if killed before the first save
    before = sorted(p.name for p in run.iterdir())
    capsys.readouterr()
    run_cli("fit", "--config", str(config))
    (aside,) = (run / "attempts").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == before  # config.yaml, hparams.yaml, the event file
    assert f"its logs moved to {aside.relative_to(workdir)}" in capsys.readouterr().err
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_fit_says_where_the_run_is_and_its_commands_work(workdir: Path, capsys) -> None:
    """At its start and end, fit names the run's directory and checkpoints, and the commands that follow; the
    resume and sample commands it prints run as printed (here with the run outside the working directory)."""
    run_cli("fit", "--config", str(write_config(workdir, max_steps=4)), "--trainer.default_root_dir", "elsewhere")
    err = capsys.readouterr().err
    assert "gptlit: run 'run' in elsewhere/lightning_logs/run, checkpoints in elsewhere/lightning_logs/run/" in err
    assert "watch:  tensorboard --logdir elsewhere/lightning_logs" in err
    end = err[err.rindex("gptlit: run 'run' in") :].splitlines()
    assert len(end) <= 6
    assert end[0].endswith(  # every run ends with a validation, so best.ckpt too
        "checkpoints: elsewhere/lightning_logs/run/checkpoints/best.ckpt, "
        "elsewhere/lightning_logs/run/checkpoints/last.ckpt"
    )
    commands = {line.split(":")[0].strip(): shlex.split(line.split(":", 1)[1]) for line in end[1:]}
    assert commands["export"][:3] == ["python", "-m", "gptlit"] and "--root_dir" in commands["export"]
    assert commands["extend"][-2:] == ["--trainer.max_steps", "8"]  # the run reached its max_steps
    run_cli(*commands["extend"][3:-2], "--trainer.max_steps", "6")
    last = workdir / "elsewhere" / "lightning_logs" / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6
    capsys.readouterr()
    run_cli(*commands["sample"][3:], "--max_new_tokens", "3", "--prompt", "Lily")
    assert capsys.readouterr().out.startswith("Lily")


def test_gptlit_help_lists_every_command(capsys) -> None:
    run_cli("--help")
    out = capsys.readouterr().out
    commands = [line.split()[0] for line in out.split("commands:\n")[1].split("\n\n")[0].splitlines()]
    assert commands == ["fit", "validate", "test", "prepare", "sample", "export", "tune"]
    assert "predict" not in out


def test_fit_help_says_what_ckpt_path_takes(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        run_cli("fit", "--help")
    assert done.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split("--ckpt_path CKPT_PATH\n")[1].split())
    assert help_text.startswith("Resume (fit) or evaluate (validate, test) a checkpoint: last")
    assert "own saved config.yaml" in help_text and "hpc" not in help_text


def test_a_run_and_its_resume_show_their_steps_and_no_noise(workdir: Path) -> None:
    """What `fit` prints in a terminal: the step of the total (also after a resume), none of Lightning's tips,
    warnings that say nothing to a gptlit user, or figures that are wrong (FLOPs of 0, epoch -2, v_num)."""
    config = write_config(workdir, max_steps=12, enable_progress_bar=True, enable_model_summary=True)
    runs = []
    for args in (["--config", str(config)], ["--ckpt_path", "last", "--trainer.max_steps", "16"]):
        command = [sys.executable, "-m", "gptlit", "fit", *args]
        run = subprocess.run(command, cwd=workdir, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
        assert run.returncode == 0, run.stderr[-3000:]
        runs.append(run.stdout + run.stderr)
    for output in runs:
        for noise in ("litlogger", "Tip:", "LeafSpec", "exists and is not empty", "FLOPs", "Epoch", "v_num"):
            assert noise not in output, (noise, output)
        assert "Parameters: " in output and "train/loss: " in output
    assert "Step 12/12 " in runs[0] and "val/bpb: " in runs[0] and "tokens/s: " in runs[0]  # after 10 steps
    assert "Step 16/16 " in runs[1] and "/12 " not in runs[1]


def test_mixed_precisions_model_summary_warning_is_silenced() -> None:
    # Lightning warns that it sizes a bf16-mixed model at 32 bits: the weights are float32 then, the size is right.
    from gptlit.cli.reporting import silence_other_libraries

    with warnings.catch_warnings(record=True) as caught:
        silence_other_libraries()
        warnings.warn("Precision bf16-mixed is not supported by the model summary.  Estimated model size", stacklevel=1)
        warnings.warn("another warning", stacklevel=1)
    assert [str(w.message) for w in caught] == ["another warning"]
