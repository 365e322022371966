"""Where a decoding pass's time goes at batch 1: the model's forward pass (eager and compiled, one token and nine),
picking the next token (greedy, top-k, top-p), and the drafting's own bookkeeping, each timed alone.

    python benchmarks/decode_step.py --checkpoint lightning_logs/tiny/checkpoints/last.ckpt

The compiled forward pass (Inductor's C++ wrapper: no Python between the kernels) is the model's own time; what the
eager pass (`GPT.cached_pass`, which decoding runs) takes beyond it is Python and the per-operation cost of eager
PyTorch; `GPT.forward`, the module calls that it stands for, is timed beside it, and so is the cached pass with
`GPT.forward`'s ``F.linear`` products instead of the form measured fastest (`gptlit.model.products`). Each figure is
the median of interleaved rounds of many calls, in microseconds per call.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from common import interleaved, machine, markdown_table, write_section
from generate import train_tiny

from gptlit.generation.decoding import CachedDecoding
from gptlit.generation.draft import NgramDraft
from gptlit.generation.sampling import TokenPicker
from gptlit.training.runs import load_model

CALLS = 200
PROMPT = 64  # tokens in the cache before the timed passes


def per_call(fn: Callable[[], object]) -> Callable[[], float]:
    """A runner for `interleaved` that returns calls per second (inverted into microseconds afterwards)."""

    def run() -> float:
        start = time.perf_counter()
        for _ in range(CALLS):
            fn()
        return CALLS / (time.perf_counter() - start)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a gptlit checkpoint (default: generate.py's tiny model)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    checkpoint = args.checkpoint or train_tiny(400)[0]
    model, _ = load_model(checkpoint)
    vocab = model.config.vocab_size
    prompt = torch.randint(vocab, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    logits = {t: torch.randn(t, vocab, generator=torch.Generator().manual_seed(t)) * 4 for t in (1, 9)}
    pickers = {
        "greedy": TokenPicker(0.0, None, None, seed=0, row=0),
        "T 0.8, top-k 40": TokenPicker(0.8, 40, None, seed=0, row=0),
        "T 0.8, top-p 0.9": TokenPicker(0.8, None, 0.9, seed=0, row=0),
    }
    draft = NgramDraft(prompt)
    runners = {}
    with torch.inference_mode(), CachedDecoding(model, 1) as eager:
        compiled = CachedDecoding(model, 1, compile=True)  # its passes use the cache the eager one set up
        eager.prefill([prompt], 0, PROMPT)
        for decoding, tag in ((eager, ""), (compiled, ", compiled")):
            for t in (1, 9):
                name = f"forward, {t} token{'s' if t > 1 else ''}{tag}"
                runners[name] = per_call(lambda fed=[prompt[:t]], decoding=decoding: decoding.run(fed, PROMPT))
                runners[name]()  # compiles, warms up
        # The reference the eager decoding pass (GPT.cached_pass) stands for, and that pass with GPT.forward's
        # F.linear products instead of the fastest measured form.
        references = {"GPT.forward": model, "F.linear products": model.cached_pass(products="linear")}
        for t in (1, 9):
            ids, positions = torch.tensor([prompt[:t]]), torch.arange(PROMPT, PROMPT + t)
            for tag, forward in references.items():
                runners[f"forward, {t} token{'s' if t > 1 else ''}, {tag}"] = per_call(
                    lambda ids=ids, positions=positions, forward=forward: forward(ids, positions, PROMPT + ids.size(1))
                )
        for name, picker in pickers.items():
            for t in (1, 9):
                runners[f"pick, {name}, {t} row{'s' if t > 1 else ''}"] = per_call(
                    lambda picker=picker, x=logits[t]: picker(x, PROMPT)
                )
        runners["draft: append a token, propose 8"] = per_call(lambda: (draft.append(prompt[0]), draft.propose(8)))
        times = {name: 1e6 / calls for name, calls in interleaved(runners, args.rounds).items()}
    rows = [[name, f"{us:,.0f}"] for name, us in times.items()]
    report = (
        f"`python benchmarks/decode_step.py`: {checkpoint} ({model.num_params() / 1e6:.1f}M parameters), batch 1, "
        f"a cache of {PROMPT} tokens; microseconds per call, median of {args.rounds} interleaved rounds of "
        f"{CALLS} calls.\nMachine: {machine()}.\n\n{markdown_table(['part of a pass', 'µs'], rows)}\n"
    )
    print(report)
    if not args.no_readme:
        write_section("Decoding: where a pass's time goes, tiny, batch 1", report)


if __name__ == "__main__":
    main()
