"""What Muon costs per training step: AdamW against Muon + AdamW (gptlit.training.optim) on the same model and batches.

    python benchmarks/optimizer.py --config tiny --rounds 5

Each variant runs gptlit's training step (forward, chunked loss, backward, clipping, optimizer step) in float32;
the report gives the median step time over interleaved rounds, the optimizer step's own share, and the ratio
to AdamW. Muon's Newton-Schulz iteration runs in float32 (gptlit's choice on a CPU) with its usual 5 steps and
with 3; one optimizer step with the iteration in bfloat16 (torch.optim.Muon's choice) is timed apart, since on
a CPU without bfloat16 units it takes seconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from common import machine, markdown_table, write_section
from train import BETAS, CLIP, LR, SHAPES, WEIGHT_DECAY

from gptlit.model.config import GPTConfig
from gptlit.model.gpt import GPT
from gptlit.training.optim import build_adamw, build_muon

MUON = {"muon_lr": 0.04, "muon_momentum": 0.95, "muon_weight_decay": 0.0, "muon_adjust_lr": "original"}


def make_optimizer(model: GPT, name: str) -> torch.optim.Optimizer:
    if name == "adamw":
        return build_adamw(model, LR, WEIGHT_DECAY, BETAS)
    dtype = torch.bfloat16 if "bf16" in name else torch.float32
    optimizer = build_muon(model, LR, WEIGHT_DECAY, BETAS, **MUON, ns_dtype=dtype)
    optimizer.muon.param_groups[0]["ns_steps"] = 3 if "3 steps" in name else 5
    return optimizer


class Stepper:
    """One variant's model, optimizer and batches; each call runs ``steps`` training steps and returns the
    seconds per step and the optimizer step's seconds per step."""

    def __init__(self, config: GPTConfig, name: str, batches: list, steps: int) -> None:
        torch.manual_seed(0)
        self.model, self.batches, self.steps = GPT(config), batches, steps
        self.optimizer = make_optimizer(self.model, name)
        self()  # warm-up: the optimizer's state is allocated

    def __call__(self) -> tuple[float, float]:
        total = in_optimizer = 0.0
        for x, y in self.batches[: self.steps]:
            start = time.perf_counter()
            self.model.loss(x, y).backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
            before_step = time.perf_counter()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            end = time.perf_counter()
            total, in_optimizer = total + end - start, in_optimizer + end - before_step
        return total / self.steps, in_optimizer / self.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    config = GPTConfig(**SHAPES[args.config])
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(config.vocab_size, (args.steps, args.batch_size, config.block_size + 1), generator=generator)
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]
    names = ["adamw", "muon, float32", "muon, float32, 3 steps"]
    steppers = {name: Stepper(config, name, batches, args.steps) for name in names}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name, stepper in steppers.items():
            times[name].append(stepper())
    bf16 = Stepper(config, "muon, bf16", batches[:1], 1)  # its warm-up is one step
    bf16.model.loss(*batches[0]).backward()
    start = time.perf_counter()
    bf16.optimizer.step()
    bf16_seconds = time.perf_counter() - start
    step = {name: statistics.median(t for t, _ in runs) for name, runs in times.items()}
    opt = {name: statistics.median(o for _, o in runs) for name, runs in times.items()}
    rows = [
        [name, f"{step[name] * 1e3:.0f}", f"{opt[name] * 1e3:.0f}", f"{step[name] / step['adamw']:.3f}"]
        for name in names
    ]
    rows.append(["muon, bfloat16 (torch's)", "", f"{bf16_seconds * 1e3:.0f}", ""])
    table = markdown_table(["optimizer", "ms per step", "ms in optimizer step", "step vs adamw"], rows)
    report = (
        f"`python benchmarks/optimizer.py --config {args.config} --rounds {args.rounds}`: {args.config} model, "
        f"batch {args.batch_size}, float32, medians of {args.rounds} interleaved rounds of {args.steps} steps.\n"
        f"Machine: {machine()}.\n\n{table}\n"
    )
    print(report)
    if not args.no_readme:
        write_section(f"Optimizer step cost: {args.config}", report)


if __name__ == "__main__":
    main()
