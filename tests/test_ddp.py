"""Two processes through Lightning's DDP strategy on CPU (gloo), launched by `python -m gptlit fit` itself.

Each rank trains on its own half of every batch; gradients are averaged, so two ranks of batch b take the
steps one process of batch 2b takes on the same windows. Only the first process prepares data and writes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import scalars, write_config, write_corpus

from gptlit.data.datamodule import TinyStoriesDataModule
from gptlit.training.runs import load_model

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent


def fit(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(TESTS), str(TESTS.parent)))}  # this checkout's gptlit
    result = subprocess.run(
        [sys.executable, "-m", "gptlit", "fit", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def callbacks(*specs: tuple[str, dict]) -> str:
    return "--trainer.callbacks+=" + json.dumps([{"class_path": path, "init_args": args} for path, args in specs])


def batches(directory: Path, rank: str) -> dict[int, list[str]]:
    """Window hashes per step that ``probes.RecordBatches`` wrote for one rank, over all its processes."""
    steps: dict[int, list[str]] = {}
    for path in directory.glob(f"{rank}-from*.json"):
        steps.update({int(step): rows for step, rows in json.loads(path.read_text()).items()})
    return steps


def test_ddp_on_two_processes_equals_one_process_with_the_doubled_batch(tmp_path: Path) -> None:
    write_corpus(tmp_path / "stories.txt")
    config = write_config(tmp_path, name="run", max_steps=4)  # checkpoints every 4 steps, dropout 0
    settings = yaml.safe_load(config.read_text())
    shutil.rmtree(tmp_path / "data")  # the DDP run prepares it
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    for root in (ddp, single):
        root.mkdir()

    # Two ranks of batch 8, 4 steps, then resumed with no config to 8 steps.
    first = fit(
        ddp,
        "--config", str(config),
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--data.batch_size", "8",
        callbacks(("probes.RecordBatches", {"out_dir": str(tmp_path / "batches-ddp")})),
    )  # fmt: skip
    run = ddp / "lightning_logs" / "run"
    assert first.stderr.count("gptlit data: preparing") == 1  # the first process only; the other one waited
    assert first.stderr.count("gptlit: run 'run' in lightning_logs/run") == 2  # where it is, at start and end, once
    assert sorted(p.name for p in (ddp / "lightning_logs").iterdir()) == ["run"]
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # one writer
    shutil.copy(run / "checkpoints" / "last.ckpt", tmp_path / "ddp-step4.ckpt")
    fit(ddp, "--ckpt_path", "last", "--trainer.max_steps", "8")  # both ranks find the same run

    # One process of batch 16, 8 steps, keeping its step-4 checkpoint.
    fit(
        single,
        "--config", str(config), "--trainer.max_steps", "8", "--data.batch_size", "16",
        callbacks(
            ("probes.RecordBatches", {"out_dir": str(tmp_path / "batches-single")}),
            (
                "lightning.pytorch.callbacks.ModelCheckpoint",
                {"dirpath": str(tmp_path / "single-steps"), "filename": "{step}", "every_n_train_steps": 4,
                 "save_top_k": -1},
            ),
        ),
    )  # fmt: skip

    # The ranks' windows are disjoint, and together they are the single process's batch, step by step.
    rank0, rank1 = batches(tmp_path / "batches-ddp", "rank0"), batches(tmp_path / "batches-ddp", "rank1")
    whole = batches(tmp_path / "batches-single", "rank0")
    assert sorted(rank0) == sorted(rank1) == sorted(whole) == list(range(8))
    for step in range(8):
        assert not set(rank0[step]) & set(rank1[step]), step
        assert sorted(rank0[step] + rank1[step]) == sorted(whole[step]), step

    # The same steps: parameters, and the loss they give, equal up to float summation order.
    dm = TinyStoriesDataModule(
        source=settings["data"]["source"], data_dir=settings["data"]["data_dir"], vocab_size=320, block_size=32
    )
    x, y = next(iter(dm.val_dataloader()))
    for ddp_ckpt, single_ckpt in (
        (tmp_path / "ddp-step4.ckpt", tmp_path / "single-steps" / "step=4.ckpt"),
        (run / "checkpoints" / "last.ckpt", tmp_path / "single-steps" / "step=8.ckpt"),
    ):
        ddp_model, _ = load_model(ddp_ckpt)
        single_model, _ = load_model(single_ckpt)
        for (name, a), b in zip(ddp_model.state_dict().items(), single_model.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
        with torch.no_grad():
            torch.testing.assert_close(ddp_model.loss(x, y), single_model.loss(x, y), rtol=1e-5, atol=0)

    # The resumed DDP run is one TensorBoard curve, written by one process per launch.
    assert [step for step, _ in scalars(run)["train/loss"]] == list(range(8))
    assert len(list(run.glob("events.out.tfevents.*"))) == 2


def test_every_rank_applies_the_same_muon_update(tmp_path: Path) -> None:
    """Muon orthogonalizes the averaged gradient on each rank: the ranks' weights stay identical."""
    write_corpus(tmp_path / "stories.txt")
    config = write_config(tmp_path, name="run", max_steps=3)
    record = callbacks(("probes.RecordParams", {"out_dir": str(tmp_path / "params")}))
    fit(tmp_path, "--config", str(config), "--trainer.strategy", "ddp", "--trainer.devices", "2",
        "--data.batch_size", "4", "--model.optimizer", "muon", record)  # fmt: skip
    ranks = [(tmp_path / "params" / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert ranks[0] == ranks[1]
    last = torch.load(tmp_path / "lightning_logs" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3 and last["optimizer_states"][0]["state"]  # Muon's and AdamW's state saved
