"""Scoring a trained run: bits per byte of a whole held-out split, every window, in float32.

A run's own ``val/bpb`` covers ``trainer.limit_val_batches`` batches of the split; comparing runs of different
shapes or batch sizes (a recipe benchmark, a hyperparameter search) wants the same text for all of them, all of it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from gptlit.checkpoint import read_checkpoint
from gptlit.data.store import check_bin, read_meta
from gptlit.errors import UsageError
from gptlit.model.gpt import GPT


@torch.inference_mode()
def split_bpb(
    model: GPT, data_dir: str | Path, split: str = "val", batch_size: int = 16, max_tokens: int | None = None
) -> float:
    """Bits per byte of ``split`` of the prepared ``data_dir`` under ``model``: the split cut into windows of
    ``block_size`` tokens (the last partial one left out), each predicted from its own start.

    ``max_tokens`` scores the split's first tokens only, one window at least (the same text for every model of
    a block_size scored with it); their bytes are counted at the whole split's bytes per token."""
    meta = read_meta(data_dir)
    path, dtype, count = check_bin(data_dir, meta, split)
    T = model.config.block_size
    count = count if max_tokens is None else min(count, max(max_tokens, T + 1))
    tokens = torch.from_numpy(np.fromfile(path, dtype=dtype, count=count).astype(np.int64))
    if count <= T:
        raise UsageError(f"{count} tokens of the {split} split fill no window of block_size {T} + 1: nothing to score")
    windows = tokens[: (count - 1) // T * T + 1]
    x = windows[:-1].view(-1, T)  # (N, T)
    y = windows[1:].view(-1, T)  # (N, T)
    device = next(model.parameters()).device
    nats = 0.0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        nats += model.loss(xb, yb).item() * len(xb)
    bytes_per_token = meta["splits"][split]["text_bytes"] / meta["splits"][split]["tokens"]
    return nats / len(x) / math.log(2) / bytes_per_token


def checkpoint_bpb(
    checkpoint: dict, data_dir: str | Path, device: str | torch.device = "cpu", max_tokens: int | None = None
) -> float:
    """Validation bits per byte of the model a checkpoint (`gptlit.checkpoint.read_checkpoint`) holds (of the first
    ``max_tokens`` tokens, when given: `split_bpb`)."""
    model = GPT.from_checkpoint(checkpoint).float().to(device).eval()
    return split_bpb(model, data_dir, max_tokens=max_tokens)


def score(run: Path, data_dir: Path, device: str | torch.device = "cpu") -> float:
    """Bits per byte of the whole held-out split under the run's last checkpoint (float32, every window)."""
    return checkpoint_bpb(read_checkpoint(run / "checkpoints" / "last.ckpt"), data_dir, device)
