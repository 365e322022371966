"""Helpers shared by test modules (fixtures live in conftest.py): configs, corpora, the CLI, run outputs."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from conftest import make_stories
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptlit.cli import cli_main

MODEL = {"block_size": 32, "embed_dim": 32, "n_heads": 2, "n_layers": 2, "dropout": 0.0}
OPTIM = {"learning_rate": 3e-3, "min_lr": 3e-4, "warmup": 4}


def write_corpus(path: Path, n: int = 400, seed: int = 0) -> Path:
    """``n`` stories of ``make_stories`` in the official TinyStories layout, each followed by ``<|endoftext|>``."""
    path.write_text("".join(f"{story}\n<|endoftext|>\n" for story in make_stories(n, seed)), encoding="utf-8")
    return path


def write_config(tmp_path: Path, name: str = "run", max_steps: int = 16, **trainer) -> Path:
    """``<tmp_path>/<name>.yaml``: a tiny model on ``<tmp_path>/stories.txt``, checkpoints every 4 steps."""
    config = {
        "seed_everything": 7,
        "trainer": {
            "max_steps": max_steps,
            "precision": "32-true",
            "accelerator": "cpu",
            "val_check_interval": 8,
            "check_val_every_n_epoch": None,
            "limit_val_batches": 2,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "deterministic": True,
            **trainer,
        },
        "model": {**MODEL, **OPTIM},
        "data": {"source": str(tmp_path / "stories.txt"), "data_dir": str(tmp_path / "data"), "vocab_size": 320},
        "checkpoint": {"every_n_train_steps": 4},
    }
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args: str) -> None:
    """``python -m gptlit <args>``, in this process."""
    cli_main(list(args))


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar in a run's TensorBoard event files."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def params(ckpt: Path) -> dict[str, torch.Tensor]:
    """The state_dict a checkpoint holds."""
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
