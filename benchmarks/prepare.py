"""Benchmark data preparation: throughput against plain ``Tokenizer.encode_batch``, peak memory, batch fetch time.

    python benchmarks/prepare.py [CORPUS] [--vocab-size 8000] [--repeats 1 10 50] [--runs 3] [--layout repository]

CORPUS defaults to the 2 MiB TinyStories sample beside the project (../shared/data/); it is also written 10x
and 50x repeated into a temporary directory. A tokenizer is trained once beforehand (timed on its own) and
passed by path, so the preparation timings cover reading + encoding + writing. Each preparation runs in a
fresh subprocess, which reports its own peak RSS. Throughputs are the best of ``--runs`` runs, since other
processes on a small machine only ever slow a run down. Prints a table and writes it into the
"## Data preparation" section of benchmarks/README.md (with ``--layout repository``: "## Data preparation,
repository"). ``--layout repository`` writes each repeated corpus as a FineWeb-Edu-like local repository
instead (parquet shards of one configuration, declared in README.md) and prepares it by configuration name with
``val_split`` null: the ``datasets`` streaming path a hub data set takes, with the same stories held out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_section

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "tinystories-train-2mib.txt"
ORDERS = ("prepare-first", "plain-first")

# One run, in a fresh interpreter: a preparation and plain encode_batch over the same stories (already in
# memory, same batches, a freshly loaded tokenizer so that its word cache starts as cold as the preparation's).
# Both passes in one process see the same background load. Imports (tqdm's included) and the start of the
# tokenizer's thread pool happen before any clock starts; the first pass still pays for growing the process's
# memory, so runs alternate which pass goes first. Peak RSS is VmHWM after the preparation (in runs where it
# goes first), not ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec.
CHILD = """
import dataclasses, json, re, sys, time
import tqdm.auto
from gptlit.data.prepare import ENCODE_BATCH_STORIES, prepare_dataset
from gptlit.data.options import DataOptions
from gptlit.data.sources import clean, read_txt
from gptlit.data.tokenizer import Tokenizer
corpus, source, config_name, data_dir, tokenizer_path, order = sys.argv[1:7]
options = DataOptions(source, config_name=config_name or None, vocab_size=None, tokenizer_path=tokenizer_path)
if config_name:  # a repository: read by datasets, imported before any clock starts
    import datasets
    options = dataclasses.replace(options, val_split=None)
Tokenizer.from_file(tokenizer_path).encode_batch(["Once upon a time."] * 64)
peak_kib = lambda: int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
result = {"imports_kib": peak_kib()}

def prepare():
    start = time.perf_counter()
    meta = prepare_dataset(options, data_dir)
    result["prepare_seconds"] = time.perf_counter() - start
    result["tokens"] = sum(split["tokens"] for split in meta["splits"].values())
    result["peak_kib"] = peak_kib()

def plain():
    stories = list(clean(read_txt(corpus), corpus))
    tokenizer = Tokenizer.from_file(tokenizer_path)
    start = time.perf_counter()
    for i in range(0, len(stories), ENCODE_BATCH_STORIES):
        tokenizer.encode_batch(stories[i : i + ENCODE_BATCH_STORIES], bos=True, eos=True)
    result["plain_seconds"] = time.perf_counter() - start

for step in (prepare, plain) if order == "prepare-first" else (plain, prepare):
    step()
print(json.dumps(result))
"""


def repeat_corpus(corpus: Path, times: int, out_dir: Path) -> Path:
    if times == 1:
        return corpus
    path = out_dir / f"{corpus.stem}-x{times}.txt"
    text = corpus.read_text(encoding="utf-8").rstrip("\n")
    # A separator between copies keeps the sample's cut-off last story from merging with the next copy's first.
    path.write_text("\n<|endoftext|>\n".join([text] * times) + "\n", encoding="utf-8")
    return path


REPOSITORY_README = """---
configs:
- config_name: sample-10BT
  data_files:
  - split: train
    path: sample/10BT/*
---
"""
# Shards and row groups smaller than the 10x and 50x corpora, so that reading one at a time shows as flat memory.
SHARD_STORIES, ROW_GROUP_STORIES = 50_000, 10_000


def write_repository(corpus: Path, out_dir: Path) -> Path:
    """``corpus``'s stories as a local repository laid out as FineWeb-Edu is (configuration ``sample-10BT``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gptlit.data.sources import clean, read_txt

    repo = out_dir / f"{corpus.stem}-repository"
    (repo / "sample" / "10BT").mkdir(parents=True)
    (repo / "README.md").write_text(REPOSITORY_README, encoding="utf-8")
    stories = list(clean(read_txt(corpus), str(corpus)))
    for shard, start in enumerate(range(0, len(stories), SHARD_STORIES)):
        table = pa.table({"text": stories[start : start + SHARD_STORIES]})
        pq.write_table(table, repo / "sample" / "10BT" / f"{shard:03d}_00000.parquet", row_group_size=ROW_GROUP_STORIES)
    return repo


def run_in_subprocess(
    corpus: Path, source: Path, config_name: str, data_dir: Path, tokenizer_path: Path, order: str
) -> dict:
    argv = (corpus, source, config_name, data_dir, tokenizer_path)
    command = [sys.executable, "-c", CHILD, *map(str, argv), order]
    result = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(result.stdout.strip().splitlines()[-1])


def batch_fetch_ms(source: Path, data_dir: Path, tokenizer_path: Path, batches: int = 300) -> float:
    """Milliseconds per training batch (block 256, batch 32, no workers) from the DataModule's loader."""
    from gptlit.data.datamodule import TextDataModule

    dm = TextDataModule(
        str(source), str(data_dir), vocab_size=None, tokenizer_path=str(tokenizer_path), block_size=256, batch_size=32
    )
    loader = dm.train_dataloader()
    iterator = iter(loader)
    next(iterator)  # warm-up
    start = time.perf_counter()
    for _ in range(batches):
        try:
            next(iterator)
        except StopIteration:
            iterator = iter(loader)
            next(iterator)
    return (time.perf_counter() - start) / batches * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", nargs="?", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--repeats", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--runs", type=int, default=4, help="runs per measurement; the best is reported")
    parser.add_argument("--no-readme", action="store_true", help="print only; leave benchmarks/README.md alone")
    parser.add_argument("--layout", choices=["txt", "repository"], default="txt", help="what each corpus is written as")
    args = parser.parse_args()

    from gptlit.data.sources import clean, read_txt
    from gptlit.data.tokenizer import train_tokenizer

    rows = []
    with tempfile.TemporaryDirectory(prefix="gptlit-bench-") as tmp_name:
        tmp = Path(tmp_name)
        start = time.perf_counter()
        tokenizer = train_tokenizer(clean(read_txt(args.corpus), str(args.corpus)), args.vocab_size)
        train_seconds = time.perf_counter() - start
        tokenizer_path = tmp / "tokenizer.json"
        tokenizer.save(tokenizer_path)
        for times in args.repeats:
            corpus = repeat_corpus(args.corpus, times, tmp)
            source, config_name = corpus, ""
            if args.layout == "repository":
                source, config_name = write_repository(corpus, tmp), "sample-10BT"
            runs = [
                run_in_subprocess(
                    corpus, source, config_name, tmp / f"data-x{times}-{i}", tokenizer_path, ORDERS[i % 2]
                )
                for i in range(args.runs)
            ]
            tokens = runs[0]["tokens"]
            rows.append(
                {
                    "times": times,
                    "mib": corpus.stat().st_size / 2**20,
                    "tokens": tokens,
                    "plain": tokens / min(r["plain_seconds"] for r in runs),
                    "prepare": tokens / min(r["prepare_seconds"] for r in runs),
                    # Each run's own ratio: its two passes saw the same background load.
                    "ratio": statistics.median(r["plain_seconds"] / r["prepare_seconds"] for r in runs),
                    # Only where the preparation ran first is its process's peak its own.
                    "peak_mib": max(r["peak_kib"] for r in runs[:: len(ORDERS)]) / 1024,
                    "imports_mib": runs[0]["imports_kib"] / 1024,
                }
            )
            print(f"{times}x done: {rows[-1]}", file=sys.stderr, flush=True)
        largest = max(args.repeats)
        fetch_ms = batch_fetch_ms(args.corpus, tmp / f"data-x{largest}-0", tokenizer_path)

    repository = args.layout == "repository"
    reference = next((r for r in rows if r["times"] == 10), rows[0])
    lines = [
        "| corpus | MiB | tokens | plain encode tok/s | preparation tok/s | prep / plain | peak RSS MiB | RSS / 10x |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['times']}x | {r['mib']:.0f} | {r['tokens']:,} | {r['plain']:,.0f} | {r['prepare']:,.0f} "
            f"| {r['ratio']:.2f} | {r['peak_mib']:.0f} | {r['peak_mib'] / reference['peak_mib']:.2f} |"
        )
    section = "\n".join(
        [
            f"`python benchmarks/prepare.py{' --layout repository' if repository else ''}` on "
            f"{date.today().isoformat()}; {machine()}.",
            f"Corpus: `{args.corpus.name}`, and it repeated; tokenizer: {tokenizer.vocab_size} tokens.",
            *(
                ["Each written as a local repository of parquet shards, read by configuration name."]
                if repository
                else []
            ),
            "",
            *lines,
            "",
            f"- Tokenizer training ({args.vocab_size} tokens, on the 1x corpus): {train_seconds:.1f} s.",
            f"- Training batch fetch (block 256, batch 32, num_workers=0, {largest}x corpus): {fetch_ms:.2f} ms/batch.",
            f"- Peak RSS after imports alone: {rows[0]['imports_mib']:.0f} MiB. Throughputs: best of {args.runs} runs;",
            "  prep / plain: median over runs of each run's ratio, where a run is one fresh process doing both the",
            "  preparation and plain `Tokenizer.encode_batch` over the stories already in memory (same batches),",
            "  alternating which goes first. Peak RSS: VmHWM of the preparation's process.",
            "- Targets: preparation >= 0.8x plain encode throughput; peak RSS at 50x <= 1.3x that at 10x.",
            "",
        ]
    )
    print(section)
    if not args.no_readme:
        write_section("Data preparation, repository" if repository else "Data preparation", section)


if __name__ == "__main__":
    main()
