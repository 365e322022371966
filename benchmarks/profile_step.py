"""Where a training step's time goes: the torch profiler over a few steps of gptlit's plain loop, by kind of work.

    python benchmarks/profile_step.py --config small --precision 32
    python benchmarks/profile_step.py --config small --precision bf16 --top 15

The step is the one `benchmarks/train.py` times (forward, chunked loss, backward, clipping, fused AdamW) on
random token batches. Each operator's self time (time in the operator itself, not in what it calls) goes
to one kind: matrix products, attention, norms, GELU, the rest of the loss, optimizer, dtype casts, and
the rest. With ``--top``, the operators that took most time are listed too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from common import machine, markdown_table, write_section
from train import SHAPES, plain_loop

from gptlit.model.config import GPTConfig
from gptlit.model.gpt import GPT

# kind -> substrings of operator names (first match wins, in this order)
KINDS = {
    "matrix products": ("addmm", "aten::mm", "aten::bmm", "matmul", "linear"),
    "attention (SDPA)": ("attention", "sdpa"),
    "norms": ("layer_norm", "rms_norm"),
    "GELU": ("gelu",),
    "loss (softmax, gather)": ("log_softmax", "logsumexp", "cross_entropy", "nll_loss", "gather", "aten::exp"),
    "optimizer and clipping": ("adam", "foreach", "norm", "clamp"),
    "dtype casts and copies": ("copy_", "to_copy", "clone", "contiguous"),
}


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KINDS.items() if any(key in lowered for key in keys)), "the rest")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(SHAPES), default="small")
    parser.add_argument("--precision", choices=["32", "bf16"], default="32")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after one warm-up step)")
    parser.add_argument("--top", type=int, default=0, help="also list the operators with the most self time")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = SHAPES[args.config]
    config = GPTConfig(**shape, dropout=0.0)
    tokens = torch.randint(0, config.vocab_size, (2, args.batch_size, config.block_size + 1))
    batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]  # (B, T) inputs and targets
    run = plain_loop(GPT(config), batches, args.precision == "bf16", args.steps)
    run()  # warm-up: first-touch page faults, kernel selection
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        rate = run()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    per_kind: dict[str, float] = {}
    for e in events:
        per_kind[kind_of(e.key)] = per_kind.get(kind_of(e.key), 0.0) + e.self_cpu_time_total
    steps = args.steps + 1  # plain_loop's run() does one untimed step first
    rows = [
        [kind, f"{t / steps / 1e3:,.0f}", f"{100 * t / total:.0f}%"]
        for kind, t in sorted(per_kind.items(), key=lambda kv: -kv[1])
    ]
    table = markdown_table(["kind", "ms per step", "share"], rows)
    report = (
        f"`python benchmarks/profile_step.py --config {args.config} --precision {args.precision}`: gptlit's plain "
        f"loop, batch {args.batch_size} x {config.block_size}, {steps} profiled steps ({rate:,.0f} tokens/s "
        f"under the profiler).\nMachine: {machine()}.\n\n{table}"
    )
    if args.top:
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]
        top_rows = [[e.key, kind_of(e.key), f"{e.self_cpu_time_total / steps / 1e3:,.1f}", str(e.count // steps)]
                    for e in top]  # fmt: skip
        report += "\n\n" + markdown_table(["operator", "kind", "ms per step", "calls per step"], top_rows)
    print(report)
    if not args.no_readme:
        write_section(f"Profile of a training step: {args.config}, {args.precision}", report)


if __name__ == "__main__":
    main()
