"""Helpers shared by test modules (fixtures live in conftest.py): configs, corpora, the CLI, run outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import make_stories
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptlit.cli.main import cli_main
from gptlit.data.datamodule import TextDataModule
from gptlit.data.sources import TXT_SEPARATOR
from gptlit.data.tokenizer import BOS_ID, EOS_ID, Tokenizer
from gptlit.generation.decoding import CachedDecoding
from gptlit.generation.draft import NgramDraft, NgramTable
from gptlit.generation.sampling import pick_tokens, token_uniforms
from gptlit.model.config import GPTConfig
from gptlit.model.gpt import GPT

VOCAB = 97  # of tiny_model
# Decoding is checked on both kinds of positions, on a Llama/Qwen3-like variant with a grouped KV cache, and on
# the GELU-gated MLP.
ARCHITECTURES = pytest.mark.parametrize(
    "arch",
    [
        dict(use_rope=True),
        dict(use_rope=False),
        dict(norm_type="rmsnorm", mlp="swiglu", n_kv_heads=2, qk_norm=True, tie_embeddings=False),
        dict(mlp="geglu"),
    ],
    ids=["rope", "learned", "gqa-qknorm", "geglu"],
)
# The variants past GPT-NeoX's shape, each on its own and all together.
VARIANTS = [
    dict(mlp="swiglu"),
    dict(mlp="relu2"),
    dict(mlp="geglu", norm_type="rmsnorm", bias=False),
    dict(n_kv_heads=2),
    dict(n_kv_heads=1, qk_norm=True),
    dict(tie_embeddings=False),
    dict(norm_type="rmsnorm", mlp="swiglu", n_kv_heads=2, qk_norm=True, tie_embeddings=False, bias=False),
]
MODEL = {"block_size": 32, "embed_dim": 32, "n_heads": 2, "n_layers": 2, "dropout": 0.0}
OPTIM = {"learning_rate": 3e-3, "min_lr": 3e-4, "warmup": 4}


def write_corpus(path: Path, n: int = 400, seed: int = 0) -> Path:
    """``n`` stories of ``make_stories`` in the official TinyStories layout, each followed by ``<|endoftext|>``."""
    path.write_text("".join(f"{story}\n<|endoftext|>\n" for story in make_stories(n, seed)), encoding="utf-8")
    return path


def write_config(tmp_path: Path, name: str = "run", max_steps: int = 16, **trainer) -> Path:
    """``<tmp_path>/<name>.yaml``: a tiny model on ``<tmp_path>/stories.txt``, checkpoints every 4 steps."""
    config = {
        "seed_everything": 7,
        "trainer": {
            "max_steps": max_steps,
            "precision": "32-true",
            "accelerator": "cpu",
            "val_check_interval": 8,
            "check_val_every_n_epoch": None,
            "limit_val_batches": 2,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "deterministic": True,
            **trainer,
        },
        "model": {"config": MODEL, **OPTIM},
        "data": {"source": str(tmp_path / "stories.txt"), "data_dir": str(tmp_path / "data"), "vocab_size": 320},
        "checkpoint": {"every_n_train_steps": 4},
    }
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args: str) -> None:
    """``python -m gptlit <args>``, in this process."""
    cli_main(list(args))


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar in a run's TensorBoard event files."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def params(ckpt: Path) -> dict[str, torch.Tensor]:
    """The state_dict a checkpoint holds."""
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


# Corpora and data modules --------------------------------------------------------------------------------


def write_stories(path: Path, stories: list[str], fmt: str, field: str = "text") -> Path:
    """Write ``stories`` as ``fmt`` with padding and blank stories mixed in, which preparation must undo.

    Records (json, jsonl, parquet) hold each story in ``field``.
    """
    messy: list[str] = []
    for i, story in enumerate(stories):
        messy.append(f"  {story}\n\n" if i % 3 == 0 else story)
        if i % 40 == 0:
            messy.append("  \n ")
    if fmt == "txt":  # the official layout; the last story has no separator after it
        path.write_text("".join(f"{s}\n{TXT_SEPARATOR}\n" for s in messy[:-1]) + messy[-1], encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"id": i, field: s}) + "\n" for i, s in enumerate(messy)), "utf-8")
    elif fmt == "json":
        path.write_text(json.dumps([{field: s} for s in messy]), encoding="utf-8")
    elif fmt == "parquet":
        pq.write_table(pa.table({field: messy, "url": [f"https://example.com/{i}" for i in range(len(messy))]}), path)
    return path


def swap_ids(path: Path) -> None:
    """Swap two different ids in the middle of a uint16 ``.bin``: every id stays valid and every id's count the
    same, so only a checksum can tell."""
    tokens = np.memmap(path, dtype=np.uint16, mode="r+")
    i = len(tokens) // 2
    j = i + int(np.flatnonzero(tokens[i:] != tokens[i])[0])
    tokens[i], tokens[j] = tokens[j], tokens[i]
    tokens.flush()


def make_dm(data_dir: Path, source: Path | str, **kwargs) -> TextDataModule:
    settings = {"vocab_size": 400, "block_size": 32, "batch_size": 4, "val_fraction": 0.05, **kwargs}
    return TextDataModule(source=str(source), data_dir=str(data_dir), **settings)


FINEWEB_README = """---
license: odc-by
configs:
- config_name: default
  data_files:
  - split: train
    path: data/*/*
- config_name: sample-10BT
  data_files:
  - split: train
    path: sample/10BT/*
---
# A corpus laid out as HuggingFaceFW/fineweb-edu is
"""


def write_fineweb_like(repo: Path, sample: list[str], other: list[str]) -> Path:
    """A local repository laid out as FineWeb-Edu is: configurations declared in README.md's front matter, each
    one train split of parquet shards in its own folder; ``sample`` in ``sample-10BT``, ``other`` in the default."""
    (repo / "sample" / "10BT").mkdir(parents=True)
    (repo / "data" / "CC-MAIN-2024-10").mkdir(parents=True)
    (repo / "README.md").write_text(FINEWEB_README, encoding="utf-8")
    half = len(sample) // 2
    write_stories(repo / "sample" / "10BT" / "000_00000.parquet", sample[:half], "parquet")
    write_stories(repo / "sample" / "10BT" / "001_00000.parquet", sample[half:], "parquet")
    write_stories(repo / "data" / "CC-MAIN-2024-10" / "000_00000.parquet", other, "parquet")
    return repo


# Models and decoding --------------------------------------------------------------------------------


def tiny_model(block_size: int = 32, seed: int = 4, vocab_size: int = VOCAB, **variant) -> GPT:
    """A tiny GPT (4 heads, 2 layers, of ``variant``) pushed far off its init (every parameter, norms included),
    so that its logits are sharp and its greedy continuations wander instead of repeating one token."""
    torch.manual_seed(seed)
    shape = dict(embed_dim=32, n_heads=4, n_layers=2, dropout=0.0)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, **shape, **variant)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def prompt(length: int, seed: int = 0) -> list[int]:
    return torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def reference_generate(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> list[int]:
    """Decoding with no KV cache: each step a full causal forward (no input_pos) over the context.

    The context is generate_stream's documented window: it grows to block_size, then restarts from
    its last block_size // 2 tokens. While the sequence fits in block_size, that is simply
    ``tokens[:, -block_size:]``. Samples are picked as generate's are: `pick_tokens` with the uniform number of
    (seed, row 0, the token's index).
    """
    window, keep = model.config.block_size, max(1, model.config.block_size // 2)
    assert len(prompt_ids) <= window
    tokens, start = torch.tensor([prompt_ids]), 0
    for _ in range(max_new_tokens):
        if tokens.size(1) - start > window:
            start = tokens.size(1) - keep
        if tokens.size(1) <= window:
            assert start == 0
            context = tokens[:, -window:]
        else:
            context = tokens[:, start:]
        logits = model(context)[:, -1]  # (1, V)
        if temperature == 0:
            next_id = logits.argmax(dim=-1)
        else:
            next_id = pick_tokens(logits, token_uniforms(seed, [(0, tokens.size(1))]), temperature, top_k, top_p)
        tokens = torch.cat((tokens, next_id.view(1, 1)), dim=1)
    return tokens[0, len(prompt_ids) :].tolist()


class CountingForward:
    """Counts the model's decoding passes (`CachedDecoding.run`, eager or compiled, prefills included) and the
    tokens fed to each pass after the prefill."""

    def __init__(self, model: GPT, monkeypatch) -> None:
        self.calls, self.fed = 0, []
        run = CachedDecoding.run

        def counted(decoding: CachedDecoding, fed: list[list[int]], pos: int) -> torch.Tensor:
            if decoding.model is model:
                self.calls += 1
                if pos > 0:
                    self.fed.append(len(fed[0]))
            return run(decoding, fed, pos)

        monkeypatch.setattr(CachedDecoding, "run", counted)


def expected_passes(
    prompt_ids: list[int], out: list[int], draft_tokens: int, block_size: int, table: NgramTable | None = None
) -> int:
    """Decoding passes that drafted decoding takes to produce ``out`` (no window slide), replayed from the output:
    each pass feeds the drafter's guesses, gains the guesses that match ``out``, and one token more."""
    draft, done = NgramDraft([*prompt_ids, out[0]], table=table), 1  # out[0] comes from the prompt's pass
    passes = 0
    while done < len(out):
        room = min(draft_tokens, block_size - len(prompt_ids) - done, len(out) - done - 1)
        guess = draft.propose(room)
        kept = 0
        while kept < len(guess) and guess[kept] == out[done + kept]:
            kept += 1
        for token in out[done : done + kept + 1]:
            draft.append(token)
        done += kept + 1
        passes += 1
    return passes


# Prepared data ---------------------------------------------------------------------------------------


def decoded_split(data_dir: Path, split: str) -> list[str]:
    """The stories in ``{split}.bin``, checking the ``<bos>``/``<eos>`` frame and meta.json's counts on the way."""
    meta = json.loads((data_dir / "meta.json").read_text())
    tokens = np.fromfile(data_dir / f"{split}.bin", dtype=meta["dtype"])
    offsets = np.load(data_dir / f"{split}_offsets.npy")
    tokenizer = Tokenizer.from_file(data_dir / "tokenizer.json")
    counts = meta["splits"][split]
    assert (len(tokens), len(offsets)) == (counts["tokens"], counts["stories"])
    stories = []
    for start, end in zip(offsets, [*offsets[1:], len(tokens)], strict=True):
        ids = tokens[start:end].tolist()
        assert ids[0] == BOS_ID and ids[-1] == EOS_ID and BOS_ID not in ids[1:-1] and EOS_ID not in ids[1:-1]
        stories.append(tokenizer.decode(ids[1:-1], skip_special_tokens=False))
    assert counts["text_bytes"] == sum(len(s.encode("utf-8")) for s in stories)
    return stories


def assert_split_of(train: list[str], val: list[str], expected: list[str]) -> None:
    """``train`` and ``val`` together are ``expected``, each in corpus order, and val is not empty."""
    assert sorted(train + val) == sorted(expected)
    for split in (train, val):
        positions = [expected.index(s) for s in split]
        assert positions == sorted(positions)
    assert len(val) >= 1


def copy_prepared(prepared: Path, tmp_path: Path) -> Path:
    """A copy of the ``prepared`` fixture's data directory in ``tmp_path``, to change."""
    shutil.copytree(prepared / "data", tmp_path / "data")
    return tmp_path / "data"
