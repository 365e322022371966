"""This tree against an earlier revision of gptlit, in one process: decoding and training steps on the same weights.

    python benchmarks/revision.py --rev f58485f                # trains configs/tiny.yaml for 400 steps first
    python benchmarks/revision.py --rev f58485f --checkpoint CKPT --data_dir DATA

On a shared machine two benchmark runs made one after the other drift apart by 10% and more, too much to show
a change of a few percent. Here the revision's `gptlit/` is taken with `git archive`, renamed `gptlit_rev` in a
temporary directory and imported beside this tree's; both models hold the checkpoint's weights and take turns
for every case, the order alternating each round. The figure to read is the median of the paired ratios
(this tree / the revision). Decoding goes through `generate` (the API both revisions share): greedy, the
openings of validation stories, as in benchmarks/generate.py; a training step is the loss's forward and
backward and an AdamW step, in float32.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from common import machine, markdown_table, rate, write_section
from generate import PROMPT_TOKENS, PROMPTS, train_tiny, validation_openings
from train import ROOT

from gptlit.generation.draft import NgramTable
from gptlit.generation.generate import generate
from gptlit.training.runs import load_model

TRAIN_BATCH = 8


def import_revision(rev: str) -> str:
    """Import ``rev``'s gptlit package as ``gptlit_rev``; returns the revision's short hash."""
    short = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True)
    if short.returncode:
        sys.exit(f"error: {rev!r} is not a revision of {ROOT}: {short.stderr.strip()}")
    where = Path(tempfile.mkdtemp(prefix="gptlit-rev-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "gptlit"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    package = (where / "gptlit").rename(where / "gptlit_rev")
    for path in package.rglob("*.py"):  # its own imports must find its own modules, not this tree's
        path.write_text(re.sub(r"\b(from|import) gptlit(?=[.\s])", r"\1 gptlit_rev", path.read_text()))
    sys.path.insert(0, str(where))
    return short.stdout.strip()


def revision_model(model: torch.nn.Module) -> torch.nn.Module:
    """The revision's GPT holding ``model``'s weights; the model must be one the revision can express."""
    config_module, model_module = (importlib.import_module(f"gptlit_rev.{name}") for name in ("config", "model"))
    known = {field.name for field in dataclasses.fields(config_module.GPTConfig)}
    ours = dataclasses.asdict(model.config)
    default = dataclasses.asdict(type(model.config)())
    unknown = [key for key in ours if key not in known and ours[key] != default[key]]
    if unknown:
        sys.exit(f"error: the revision has no {', '.join(unknown)}: choose a checkpoint of a model it can express")
    theirs = model_module.GPT(config_module.GPTConfig(**{key: ours[key] for key in known if key in ours}))
    theirs.load_state_dict(model.state_dict())
    return theirs.eval()


def training_rate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def run() -> float:
        model.train()
        start = time.perf_counter()
        model.loss(x, y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return x.numel() / (time.perf_counter() - start)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="the earlier revision (a commit, tag or branch)")
    parser.add_argument("--checkpoint", type=Path, help="a gptlit checkpoint (default: train configs/tiny.yaml)")
    parser.add_argument("--data_dir", type=Path, help="the checkpoint's prepared data (prompts and corpus table)")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    if args.checkpoint and not args.data_dir:
        parser.error("--checkpoint needs --data_dir, the directory its model was trained from")
    checkpoint, data_dir = (args.checkpoint, args.data_dir) if args.checkpoint else train_tiny(400)
    short = import_revision(args.rev)
    rev_generate = importlib.import_module("gptlit_rev.generate").generate
    rev_table = importlib.import_module("gptlit_rev.draft").NgramTable.from_data_dir(data_dir)
    ours, _ = load_model(checkpoint)
    theirs = revision_model(ours)
    tables = {ours: NgramTable.from_data_dir(data_dir), theirs: rev_table}
    prompts = torch.tensor(validation_openings(data_dir, PROMPTS, PROMPT_TOKENS))  # (8, 16)
    n = args.new_tokens

    def decode(fn, model, batch: int, table: bool = False, **options) -> list[list[int]]:
        draft_table = tables[model] if table else None
        chunks = prompts.split(batch)
        return [row for chunk in chunks for row in fn(model, chunk, n, 0, draft_table=draft_table, **options)]

    cases = {  # name: options of generate, and the batch
        "batch 1, generate": ({}, 1),
        "batch 1, + corpus table": ({"table": True}, 1),
        "batch 1, compiled": ({"compile": True}, 1),
        "batch 1, one token per pass": ({"draft_tokens": 0}, 1),
        "batch 8, generate": ({}, 8),
        "batch 8, compiled": ({"compile": True}, 8),
    }
    runners, identical, sides = {}, {}, ((rev_generate, theirs), (generate, ours))
    for name, (options, batch) in cases.items():
        outputs = [decode(fn, model, batch, **options) for fn, model in sides]
        identical[name] = outputs[0] == outputs[1]  # also compiles the compiled cases before timing
        runners[name] = [rate(partial(decode, fn, model, batch, **options), PROMPTS * n) for fn, model in sides]
    torch.manual_seed(0)
    batch = torch.randint(ours.config.vocab_size, (TRAIN_BATCH, ours.config.block_size + 1))
    x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()  # 0.1.0 needs contiguous targets
    # The steps train copies: the decoding cases keep the checkpoint's weights.
    train_name = f"training step, batch {TRAIN_BATCH} x {ours.config.block_size}"
    runners[train_name] = [training_rate(copy.deepcopy(model), x, y) for model in (theirs, ours)]
    for rev_run, our_run in runners.values():  # a warm-up call each
        rev_run(), our_run()

    rates: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in runners}
    for round_ in range(args.rounds):
        for name, (rev_run, our_run) in runners.items():
            order = ((0, rev_run), (1, our_run)) if round_ % 2 == 0 else ((1, our_run), (0, rev_run))
            for side, run in order:
                rates[name][side].append(run())

    rows = []
    for name, (rev_rates, our_rates) in rates.items():
        paired = [ours_ / theirs_ for theirs_, ours_ in zip(rev_rates, our_rates, strict=True)]
        low, mid, high = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
        same = str(identical[name]) if name in identical else "-"
        rows.append([name, f"{statistics.median(rev_rates):,.0f}", f"{statistics.median(our_rates):,.0f}",
                     f"{mid:.3f} ({low:.2f}-{high:.2f})", same])  # fmt: skip
    header = ["case", f"{short} tokens/s", "this tree tokens/s", "this / revision (quartiles)", "same tokens"]
    table = markdown_table(header, rows)
    report = (
        f"`python benchmarks/revision.py --rev {args.rev}`: {checkpoint} ({ours.num_params() / 1e6:.1f}M "
        f"parameters); greedy decoding of {PROMPTS} validation openings ({PROMPT_TOKENS} tokens), {n} new tokens "
        f"each; {args.rounds} rounds, the two sides alternating (medians; the ratio is the median of each "
        f"round's pair, with its quartiles: a spread that straddles 1 is the machine's noise).\n"
        f"Machine: {machine()}.\n\n{table}"
    )
    print(report)
    if not args.no_readme:
        write_section(f"Against revision {short}", report)


if __name__ == "__main__":
    main()
