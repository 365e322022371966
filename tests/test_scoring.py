"""Scoring a model on a held-out split (gptlit.training.scoring): bits per byte against the same sum done by hand
with the model's per-token losses, on the whole split and on its first tokens."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_model

from gptlit.data.store import read_meta
from gptlit.errors import UsageError
from gptlit.training.scoring import split_bpb


def by_hand(model, data_dir: Path, count: int | None = None) -> float:
    """Nats of every whole block_size window of the split's first ``count`` tokens, token by token, in bits per
    byte at the split's bytes per token."""
    meta = read_meta(data_dir)
    split = meta["splits"]["val"]
    tokens = torch.from_numpy(np.fromfile(data_dir / "val.bin", dtype=meta["dtype"])[:count].astype(np.int64))
    T, nats, windows = model.config.block_size, 0.0, 0
    for start in range(0, len(tokens) - T, T):
        with torch.no_grad():
            logits = model(tokens[start : start + T][None])[0]  # (T, V)
        nats += torch.nn.functional.cross_entropy(logits, tokens[start + 1 : start + T + 1], reduction="sum").item()
        windows += 1
    return nats / (windows * T) / math.log(2) / (split["text_bytes"] / split["tokens"])


def test_a_split_scores_its_windows_bits_per_byte(prepared: Path) -> None:
    data_dir = prepared / "data"
    model = tiny_model(vocab_size=read_meta(data_dir)["vocab_size"])
    assert split_bpb(model, data_dir) == pytest.approx(by_hand(model, data_dir), rel=1e-5)
    # The first 100 tokens: three windows of 32, the same text for every model scored so.
    assert split_bpb(model, data_dir, max_tokens=100) == pytest.approx(by_hand(model, data_dir, 100), rel=1e-5)
    assert split_bpb(model, data_dir, max_tokens=10**9) == split_bpb(model, data_dir)
    # Fewer tokens than a window: the first window all the same.
    assert split_bpb(model, data_dir, max_tokens=10) == pytest.approx(by_hand(model, data_dir, 33), rel=1e-5)
    # A split shorter than one window has nothing to score: said in one line.
    with pytest.raises(UsageError, match="fill no window"):
        split_bpb(tiny_model(block_size=4096, vocab_size=model.config.vocab_size), data_dir)
