"""What evaluation costs: ``GPT.loss`` under ``torch.inference_mode()`` (Lightning's validation and test) against
the plain forward pass + cross-entropy, which is the least it can cost.

    python benchmarks/eval_cost.py [--vocab 8192] [--layers 1] [--rounds 20]

Prints the ratio (1.0: evaluation does forward work only). ``--write`` records it in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from common import interleaved, machine, markdown_table, write_section

from gptlit.model.config import GPTConfig
from gptlit.model.gpt import GPT


def rate(fn, batches: int = 3) -> float:
    """Calls per second of ``fn`` under inference mode."""
    with torch.inference_mode():
        fn()  # warm-up
        start = time.perf_counter()
        for _ in range(batches):
            fn()
    return batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--write", action="store_true", help="record the result in benchmarks/README.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=args.vocab, block_size=256, embed_dim=256, n_heads=4, n_layers=args.layers)
    model = GPT(config).eval()  # parameters require grad, as in a LightningModule under validation
    x, y = torch.randint(0, args.vocab, (2, 16, 256)).unbind(0)

    def plain() -> None:
        F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    def ours() -> None:
        model.loss(x, y)

    rates = interleaved({"forward + cross-entropy": lambda: rate(plain), "GPT.loss": lambda: rate(ours)}, args.rounds)
    ratio = rates["forward + cross-entropy"] / rates["GPT.loss"]
    rows = [[name, f"{value:.2f}"] for name, value in rates.items()]
    table = markdown_table(["under inference_mode", "batches/s"], rows)
    summary = f"- GPT.loss costs {ratio:.2f}x the plain forward + cross-entropy (1.00: forward work only)."
    print(table + "\n" + summary)
    if args.write:
        header = (
            f"`python benchmarks/eval_cost.py`: vocabulary {args.vocab}, {args.layers} layer(s) of width 256, "
            f"batch 16 x 256, {args.rounds} interleaved rounds (median).\nMachine: {machine()}."
        )
        write_section("Evaluation cost", f"{header}\n\n{table}\n\n{summary}")


if __name__ == "__main__":
    main()
