"""Does bf16-mixed train as well as float32? The `tiny` model trained both ways on the same batches.

    python benchmarks/precision.py --steps 200

Prints the training loss along the way (averaged over windows of steps), the final validation loss, and the
wall time of each run; writes them to benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import lightning as L
from common import machine, markdown_table, write_section
from train import CORPUS, SHAPES

from gptlit.data.datamodule import TextDataModule
from gptlit.model.config import GPTConfig
from gptlit.training.module import GPTLitModule


class LossLog(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def train(precision: str, steps: int, data: TextDataModule, work: str) -> tuple[list[float], float, float]:
    L.seed_everything(1337, verbose=False)
    module = GPTLitModule(GPTConfig(**SHAPES["tiny"], dropout=0.0), learning_rate=1e-3, min_lr=1e-4, warmup=0.05)
    log = LossLog()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        precision=precision,
        gradient_clip_val=1.0,
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        limit_val_batches=20,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[log],
        default_root_dir=work,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    elapsed = time.perf_counter() - start
    return log.losses, float(trainer.callback_metrics["val/loss"]), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="gptlit-precision-")
    data = TextDataModule(
        source=str(CORPUS), data_dir=f"{work}/data", vocab_size=4096, block_size=256, batch_size=args.batch_size
    )
    with contextlib.redirect_stdout(sys.stderr):
        data.prepare_data()
        runs = {precision: train(precision, args.steps, data, work) for precision in ("32-true", "bf16-mixed")}

    window = max(1, args.steps // 8)
    header = ["steps", *runs]
    rows = []
    for start in range(0, args.steps, window):
        means = [
            sum(losses[start : start + window]) / len(losses[start : start + window]) for losses, *_ in runs.values()
        ]
        rows.append([f"{start + 1}-{min(start + window, args.steps)}", *(f"{m:.3f}" for m in means)])
    rows.append(["val/loss at the end", *(f"{val:.3f}" for _, val, _ in runs.values())])
    rows.append(["wall time (s)", *(f"{elapsed:.0f}" for *_, elapsed in runs.values())])
    (_, val32, t32), (_, val16, t16) = runs["32-true"], runs["bf16-mixed"]
    report = (
        f"`python benchmarks/precision.py --steps {args.steps}`: the `tiny` model, batch {args.batch_size} x 256, "
        f"the same seed and batches.\nMachine: {machine()}.\n\n"
        + markdown_table(header, rows)
        + f"\n\n- bf16-mixed: {t32 / t16:.2f}x the speed of float32; final val/loss differs by {val16 - val32:+.3f}."
    )
    print(report)
    if not args.no_readme:
        write_section("Precision: bf16-mixed against float32", report)


if __name__ == "__main__":
    main()
