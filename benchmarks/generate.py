"""Decoding speed: gptlit's `generate` against transformers' `generate` on the same weights, greedy.

    python benchmarks/generate.py                      # trains configs/tiny.yaml for 400 steps first (~3 min)
    python benchmarks/generate.py --checkpoint lightning_logs/tiny/checkpoints/last.ckpt --data_dir data/tinystories-4k

The model is a trained gptlit checkpoint (greedy decoding of random weights says little about real text);
transformers decodes its `gptlit export` (GPTNeoXForCausalLM). The prompts are the first 16 tokens of
validation stories (never seen in training, nor by the n-gram tables); both sides must produce identical
tokens. gptlit is timed as it runs by default (drafted tokens checked in each forward pass at batch 1),
with the n-gram table of its training data (`NgramTable.from_data_dir`) or of its own greedy
continuations of training-story openings (`NgramTable.from_model`, built before timing), compiled
(`compile=True`, compilation excluded: one warm-up call first), and with one token per pass;
transformers plain and with its own prompt lookup (`prompt_lookup_num_tokens`, batch 1 only).
Also: gptlit with and without its KV cache at 512 new tokens.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
import torch
from common import interleaved, machine, markdown_table, rate, write_section
from train import CORPUS, ROOT

from gptlit.data.store import check_bin, offsets_path, read_meta
from gptlit.export.command import export
from gptlit.generation.draft import NgramTable
from gptlit.generation.generate import generate
from gptlit.model.gpt import GPT
from gptlit.training.runs import load_model

PROMPT_TOKENS, PROMPTS = 16, 8
MODEL_TABLE_STORIES = 256  # training-story openings the model's own table is decoded from


def train_tiny(steps: int) -> tuple[Path, Path]:
    """Train configs/tiny.yaml on the TinyStories sample for ``steps`` steps (kept for later runs).

    Returns the last checkpoint and the prepared data directory."""
    work = Path(tempfile.gettempdir()) / f"gptlit-bench-tiny-{steps}"
    ckpt, finished = work / "lightning_logs" / "tiny" / "checkpoints" / "last.ckpt", work / "finished"
    if not finished.exists():  # a run cut short leaves a last.ckpt of fewer steps: train again
        print(f"training configs/tiny.yaml for {steps} steps in {work} ...", flush=True)
        work.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "gptlit", "fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
                   "--data.source", str(CORPUS), "--trainer.max_steps", str(steps), "--overwrite", "true",
                   "--trainer.val_check_interval", str(steps), "--trainer.enable_progress_bar", "false"]  # fmt: skip
        subprocess.run(command, cwd=work, check=True, stdout=subprocess.DEVNULL)
        finished.touch()
    return ckpt, work / "data" / "tinystories-4k"


def validation_openings(data_dir: Path, count: int, length: int) -> list[list[int]]:
    """The first ``length`` tokens (<bos> included) of the first ``count`` validation stories."""
    path, dtype, _ = check_bin(data_dir, read_meta(data_dir), "val")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    return [
        tokens[start : start + length].astype(np.int64).tolist()
        for start in np.load(offsets_path(data_dir, "val"))[:count]
    ]


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
    parser.add_argument("--checkpoint", type=Path, help="a gptlit checkpoint (default: train configs/tiny.yaml)")
    parser.add_argument("--data_dir", type=Path, help="the checkpoint's prepared data (prompts and corpus table)")
    parser.add_argument("--train_steps", type=int, default=400)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    if args.checkpoint and not args.data_dir:
        parser.error("--checkpoint needs --data_dir, the directory its model was trained from")
    checkpoint, data_dir = (args.checkpoint, args.data_dir) if args.checkpoint else train_tiny(args.train_steps)
    ours, _ = load_model(checkpoint)
    corpus_table = NgramTable.from_data_dir(data_dir)
    hf_dir = Path(tempfile.mkdtemp(prefix="gptlit-bench-hf-")) / "hf"
    export(str(checkpoint), str(hf_dir))
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompts = torch.tensor(validation_openings(data_dir, PROMPTS, PROMPT_TOKENS))  # (8, 16)
    n = args.new_tokens

    def hf(batch: int, lookup: int | None = None) -> list[list[int]]:
        out = []
        with torch.inference_mode():
            for chunk in prompts.split(batch):
                ids = theirs.generate(chunk, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                      pad_token_id=0, prompt_lookup_num_tokens=lookup)  # fmt: skip
                out += ids[:, PROMPT_TOKENS:].tolist()
        return out

    def gptlit(batch: int, **options) -> list[list[int]]:
        return [row for chunk in prompts.split(batch) for row in generate(ours, chunk, n, 0, **options)]

    variants = {
        "gptlit generate": lambda b: gptlit(b),
        "gptlit + corpus table": lambda b: gptlit(b, draft_table=corpus_table),
        "gptlit + corpus table, compiled": lambda b: gptlit(b, draft_table=corpus_table, compile=True),
        "gptlit + model's table": lambda b: gptlit(b, draft_table=model_table),
        "gptlit + model's table, compiled": lambda b: gptlit(b, draft_table=model_table, compile=True),
        "gptlit, compiled": lambda b: gptlit(b, compile=True),
        "gptlit, one token per pass": lambda b: gptlit(b, draft_tokens=0),
        "transformers generate": lambda b: hf(b),
        "transformers, prompt lookup": lambda b: hf(b, lookup=8),
    }
    expected = {b: hf(b) for b in (1, 8)}
    batch_1_only = ("lookup", "table")  # drafting is for one prompt at a time
    cases = [(name, b) for b in (1, 8) for name in variants if b == 1 or not any(w in name for w in batch_1_only)]
    # Compile first: batch 1 and batch 8 get graphs of their own.
    gptlit(1, draft_table=corpus_table, compile=True), gptlit(8, compile=True)
    start = time.perf_counter()
    model_table = NgramTable.from_model(ours, data_dir, stories=MODEL_TABLE_STORIES, compile=True)
    model_table_seconds = time.perf_counter() - start
    identical = {(name, b): variants[name](b) == expected[b] for name, b in cases}

    runners = {(name, b): rate(partial(variants[name], b), PROMPTS * n) for name, b in cases}
    rates = interleaved(runners, args.rounds)
    base = {b: rates[("transformers generate", b)] for b in (1, 8)}
    rows_ = [[f"batch {b}", name, f"{rates[(name, b)]:,.0f}", f"{rates[(name, b)] / base[b]:.2f}",
              str(identical[(name, b)])] for (name, b) in runners]  # fmt: skip
    table = markdown_table(["greedy", "variant", "tokens/s", "vs transformers generate", "identical tokens"], rows_)

    long, one = 512, prompts[:1]
    cache_runners = {
        "cached": rate(lambda: generate(ours, one, long, temperature=0, draft_tokens=0), long),
        "uncached": rate(lambda: uncached_greedy(ours, one, long), long),
    }
    cache_rates = interleaved(cache_runners, max(1, args.rounds - 1))
    config = ours.config
    model_text = (
        f"{args.checkpoint}"
        if args.checkpoint
        else f"configs/tiny.yaml trained {args.train_steps} steps on the TinyStories sample"
    )

    def size(table: NgramTable) -> str:
        return ", ".join(f"{len(t):,} {n}-grams" for n, t in table.next.items())

    report = (
        f"`python benchmarks/generate.py`: {model_text} ({ours.num_params() / 1e6:.1f}M parameters); "
        f"the openings ({PROMPT_TOKENS} tokens) of {PROMPTS} validation stories, {n} new tokens each, "
        f"{args.rounds} interleaved rounds (median). Corpus table: `NgramTable.from_data_dir`, the training "
        f"split ({size(corpus_table)}). Model's table: `NgramTable.from_model(compile=True)`, its greedy "
        f"continuations of {MODEL_TABLE_STORIES} training-story openings ({size(model_table)}; built in "
        f"{model_table_seconds:.1f} s).\n"
        f"Machine: {machine()}.\n\n{table}\n\n"
        f"- KV cache at {long} new tokens (batch 1, one token per pass, block {config.block_size}: the cache "
        f"slides, the uncached loop re-reads the last {config.block_size} tokens): cached "
        f"{cache_rates['cached']:,.0f} tokens/s, uncached {cache_rates['uncached']:,.0f} tokens/s, ratio "
        f"{cache_rates['cached'] / cache_rates['uncached']:.2f}."
    )
    print(report)
    if not args.no_readme:
        write_section("Decoding: tiny", report)


if __name__ == "__main__":
    main()
