"""Decoding speed: gptlit's `generate` against transformers' `generate` on the same weights, greedy.

    python benchmarks/generate.py --config tiny

The transformers model is the `gptlit export` of a gptlit model (random weights pushed off their init, so
greedy decoding does not collapse onto one token); both decode the same prompts and must produce identical
tokens. Also: gptlit with and without its KV cache at 512 new tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch
from common import interleaved, machine, markdown_table, write_section
from train import SHAPES

from gptlit.config import GPTConfig
from gptlit.generate import generate
from gptlit.hf_mapping import neox_config_dict, to_neox_state_dict
from gptlit.model import GPT


def build_models(config: GPTConfig):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ours = GPT(config).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out_dir = Path(tempfile.mkdtemp(prefix="gptlit-bench-hf-"))
    import json

    (out_dir / "config.json").write_text(json.dumps(neox_config_dict(config)))
    save_file(to_neox_state_dict(ours.state_dict(), config), str(out_dir / "model.safetensors"))
    theirs = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    return ours, theirs


def uncached_greedy(model: GPT, prompt: torch.Tensor, max_new_tokens: int) -> list[int]:
    """Greedy decoding that re-reads the whole context (up to block_size) for every token."""
    tokens = prompt
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = model(tokens[:, -model.config.block_size :])[:, -1]
            tokens = torch.cat((tokens, logits.argmax(-1, keepdim=True)), dim=1)
    return tokens[0, prompt.size(1) :].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    config = GPTConfig(**SHAPES[args.config], dropout=0.0)
    ours, theirs = build_models(config)
    n = args.new_tokens
    g = torch.Generator().manual_seed(1)
    prompts = {b: torch.randint(3, config.vocab_size, (b, 16), generator=g) for b in (1, 8)}

    def hf(batch: int) -> list[list[int]]:
        with torch.inference_mode():
            out = theirs.generate(
                prompts[batch], max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        return out[:, 16:].tolist()

    def ours_(batch: int) -> list[list[int]]:
        return generate(ours, prompts[batch], n, temperature=0)

    identical = {b: hf(b) == ours_(b) for b in (1, 8)}

    def rate(fn, batch: int, tokens: int):
        def run() -> float:
            start = time.perf_counter()
            fn(batch)
            return batch * tokens / (time.perf_counter() - start)

        return run

    runners = {
        "gptlit generate, batch 1": rate(ours_, 1, n),
        "transformers generate, batch 1": rate(hf, 1, n),
        "gptlit generate, batch 8": rate(ours_, 8, n),
        "transformers generate, batch 8": rate(hf, 8, n),
    }
    rates = interleaved(runners, args.rounds)

    long = 512
    cache_runners = {
        "gptlit cached, 512 new": lambda: long / _timed(lambda: generate(ours, prompts[1], long, temperature=0)),
        "gptlit uncached, 512 new": lambda: long / _timed(lambda: uncached_greedy(ours, prompts[1], long)),
    }
    cache_rates = interleaved(cache_runners, max(1, args.rounds - 1))

    rows = [
        ["batch 1", f"{rates['gptlit generate, batch 1']:,.0f}", f"{rates['transformers generate, batch 1']:,.0f}",
         f"{rates['gptlit generate, batch 1'] / rates['transformers generate, batch 1']:.2f}", str(identical[1])],
        ["batch 8", f"{rates['gptlit generate, batch 8']:,.0f}", f"{rates['transformers generate, batch 8']:,.0f}",
         f"{rates['gptlit generate, batch 8'] / rates['transformers generate, batch 8']:.2f}", str(identical[8])],
    ]  # fmt: skip
    table = markdown_table(
        ["greedy, tokens/s", "gptlit", "transformers", "gptlit / transformers", "identical tokens"], rows
    )
    cached, uncached = cache_rates["gptlit cached, 512 new"], cache_rates["gptlit uncached, 512 new"]
    report = (
        f"`python benchmarks/generate.py --config {args.config}`: {n} new tokens after a 16-token prompt, "
        f"{args.rounds} interleaved rounds (median).\nMachine: {machine()}.\n\n{table}\n\n"
        f"- KV cache at {long} new tokens (batch 1, block {config.block_size}: the cache slides, the uncached "
        f"loop re-reads the last {config.block_size} tokens): cached {cached:,.0f} tokens/s, uncached "
        f"{uncached:,.0f} tokens/s, ratio {cached / uncached:.2f}."
    )
    print(report)
    if not args.no_readme:
        write_section(f"Decoding: {args.config}", report)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
