"""Decoding speed by temperature: gptlit's drafted decoding against its one-token-per-pass loop and transformers'
`generate`, greedy and sampled, on the same weights at batch 1.

    python benchmarks/sampling.py --checkpoint lightning_logs/tiny/checkpoints/last.ckpt --data_dir data/tinystories-4k

The model is a trained gptlit checkpoint (the `tiny.yaml` model; by default `benchmarks/generate.py`'s); transformers
decodes its `gptlit export`. The prompts are the first 16 tokens of validation stories; each is continued by
``--new_tokens`` tokens (no end-of-text stop), one prompt at a time, as `python -m gptlit sample` does. Sampling is at
top-k 40 with top-p off on both sides, and at T 0.8 also with `sample`'s default top-p of 0.95 on both sides. For each
setting: gptlit as `sample` runs it by default (guesses from the story and from the n-grams of the run's training
data), with guesses from the story alone (`--draft_data none`), compiled (`--compile`), and one token per pass;
transformers plain. Columns: tokens per second (median of interleaved rounds), the ratio to transformers at the same
setting, forward passes' tokens (new tokens per pass), the share of guessed tokens confirmed, and whether drafted
decoding wrote the tokens of the one-token loop (sampling: the same seed; greedy: also transformers' tokens).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch
from common import interleaved, machine, markdown_table, rate, write_section
from generate import train_tiny, validation_openings

from gptlit.export.command import export
from gptlit.generation.decoding import CachedDecoding
from gptlit.generation.draft import NgramTable
from gptlit.generation.generate import generate
from gptlit.training.runs import load_model

PROMPT_TOKENS, PROMPTS, TOP_K = 16, 8, 40
TEMPERATURES = (0.0, 0.5, 0.8, 1.0)


class PassCounter:
    """Counts the decoding passes of a model and the guesses fed in them (a pass at position 0 is a prefill)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.passes = self.guessed = 0
        self.run = run = CachedDecoding.run

        def counted(decoding: CachedDecoding, fed: list[list[int]], pos: int) -> torch.Tensor:
            if decoding.model is model:
                self.passes += 1
                if pos > 0:
                    self.guessed += len(fed[0]) - 1
            return run(decoding, fed, pos)

        CachedDecoding.run = counted

    def remove(self) -> None:
        CachedDecoding.run = self.run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a gptlit checkpoint (default: generate.py's tiny model)")
    parser.add_argument("--data_dir", type=Path, help="the checkpoint's prepared data (prompts and corpus table)")
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--temperatures", type=float, nargs="+", default=list(TEMPERATURES), help="0 is greedy")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    if args.checkpoint and not args.data_dir:
        parser.error("--checkpoint needs --data_dir, the directory its model was trained from")
    checkpoint, data_dir = (args.checkpoint, args.data_dir) if args.checkpoint else train_tiny(400)
    ours, _ = load_model(checkpoint)
    table = NgramTable.from_data_dir(data_dir)
    hf_dir = Path(tempfile.mkdtemp(prefix="gptlit-bench-hf-")) / "hf"
    export(str(checkpoint), str(hf_dir))
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompts = validation_openings(data_dir, PROMPTS, PROMPT_TOKENS)
    n = args.new_tokens

    def hf(temperature: float, top_p: float | None) -> list[list[int]]:
        sampling = dict(do_sample=True, temperature=temperature, top_k=TOP_K, top_p=top_p or 1.0) if temperature else {}
        sampling.setdefault("do_sample", False)
        out = []
        with torch.inference_mode():
            for i, ids in enumerate(prompts):
                torch.manual_seed(i)
                done = theirs.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                                       pad_token_id=0, **sampling)  # fmt: skip
                out.append(done[0, PROMPT_TOKENS:].tolist())
        return out

    def gptlit(temperature: float, top_p: float | None, **options) -> list[list[int]]:
        top_k = TOP_K if temperature else None
        runs = enumerate(prompts)
        return [generate(ours, ids, n, temperature, top_k, top_p, seed=i, **options)[0] for i, ids in runs]

    variants = {
        "gptlit sample": partial(gptlit, draft_table=table),
        "gptlit sample --draft_data none": gptlit,
        "gptlit sample --compile": partial(gptlit, draft_table=table, compile=True),
        "gptlit, one token per pass": partial(gptlit, draft_tokens=0),
        "transformers generate": hf,
    }
    gptlit(0.0, None, compile=True), gptlit(0.8, None, compile=True, draft_tokens=0)  # compile outside the timing
    settings = [(t, None) for t in args.temperatures] + ([(0.8, 0.95)] if 0.8 in args.temperatures else [])
    rows = []
    for temperature, top_p in settings:
        reference = gptlit(temperature, top_p, draft_tokens=0)
        if temperature == 0:  # greedy: the stories whose every token transformers' greedy decoding writes too
            agree = sum(a == b for a, b in zip(reference, hf(0.0, None), strict=True))
        checks = {}
        for name, run in variants.items():  # eager first: a compiled variant's passes are its eager twin's
            compiled = name.endswith(" --compile")
            if name.startswith("transformers"):
                checks[name] = (None, None, None)
                continue
            counter = None if compiled else PassCounter(ours)
            out = run(temperature, top_p)
            same = out == reference
            if compiled:
                checks[name] = (*checks["gptlit sample"][:2], same)
                continue
            counter.remove()
            new = sum(map(len, out))
            accepted = new - counter.passes  # each pass gives its confirmed guesses and one token more
            checks[name] = (new / counter.passes, accepted / counter.guessed if counter.guessed else None, same)
        runners = {name: rate(partial(run, temperature, top_p), PROMPTS * n) for name, run in variants.items()}
        rates = interleaved(runners, args.rounds)
        base = rates["transformers generate"]
        label = "greedy" if temperature == 0 else f"T {temperature:g}, top-k {TOP_K}"
        label += f", top-p {top_p:g} (sample's defaults)" if top_p else ""
        for name in variants:
            per_pass, acceptance, same = checks[name]
            transformers = name.startswith("transformers")
            rows.append([
                label, name, f"{rates[name]:,.0f}", f"{rates[name] / base:.2f}",
                "" if transformers else f"{per_pass:.2f}", "" if acceptance is None else f"{acceptance:.0%}",
                "" if transformers else str(same),
            ])  # fmt: skip
        print(rows[-len(variants) :], flush=True)
    header = ["decoding", "variant", "tokens/s", "vs transformers", "tokens per pass", "guesses confirmed", "same"]
    greedy_note = (
        f"- Greedy: transformers writes the same {n} tokens as gptlit for {agree} of the {PROMPTS} prompts; the "
        "others differ from some position on.\n"
        if 0.0 in args.temperatures
        else ""
    )
    report = (
        f"`python benchmarks/sampling.py`: {checkpoint} ({ours.num_params() / 1e6:.1f}M parameters); the openings "
        f"({PROMPT_TOKENS} tokens) of {PROMPTS} validation stories, {n} new tokens each, batch 1, {args.rounds} "
        "interleaved rounds (median); n-gram table: the training split's (`sample`'s default). \"same\": the variant "
        f"wrote the tokens of one token per pass with the same seed.\n"
        f"Machine: {machine()}.\n\n{markdown_table(header, rows)}\n\n{greedy_note}"
    )
    print(report)
    if not args.no_readme:
        write_section("Decoding by temperature: tiny, batch 1", report)


if __name__ == "__main__":
    main()
