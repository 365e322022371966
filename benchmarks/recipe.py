"""Which training recipe learns the most per CPU-minute: validation bits per byte of candidates on the TinyStories
slice, at equal tokens (one pass over the training split) or at equal wall-clock (minutes of training).

    python benchmarks/recipe.py --budget tokens --seeds 0 1                   # every candidate, one pass each
    python benchmarks/recipe.py --budget minutes --minutes 10 --candidates tiny-260 tiny --seeds 0 1

Every run is `python -m gptlit fit` in a subprocess, on the shared 2 MiB slice with 10% of its stories held out
(~230 stories, ~50k tokens: enough to tell 1% apart), and is scored on all of them afterwards (bpb of the last
checkpoint, in float32). "0.1.0" is gptlit 0.1.0's configs/tiny.yaml; "tiny" is today's configs/tiny.yaml;
"tiny-260" is configs/tiny.yaml as it was sized in steps (260 steps, float32); the others change one thing of a
reference recipe (``--reference``). A minutes budget is gptlit's own: ``trainer.max_time`` with no ``max_steps``, so
the schedule is planned over the time from the measured speed (a candidate with its own ``max_steps``, such as
tiny-260, runs its steps instead); the table reports the steps each run took and its training minutes (Lightning's
``Timer``: validation and checkpoints included). Results: a table with ratios to the first candidate, and ``--write``
puts it in benchmarks/README.md. A run that ``--work`` already holds, finished with the same settings, is scored
again rather than retrained (``--fresh`` retrains it): the table can gather runs made in several invocations.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch
import yaml
from common import machine, markdown_table, write_section
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptlit.data.store import read_meta
from gptlit.training.scoring import score

ROOT = Path(__file__).parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "tinystories-train-2mib.txt"
VAL_FRACTION = 0.1

# gptlit 0.1.0's configs/tiny.yaml, the baseline (model keys in today's nesting).
RECIPE_0_1_0 = {
    "trainer": {"precision": "bf16-mixed", "gradient_clip_val": 1.0},
    "model": {
        "config": {"block_size": 256, "embed_dim": 256, "n_heads": 4, "n_layers": 4, "dropout": 0.0},
        "learning_rate": 1.0e-3,
        "min_lr": 1.0e-4,
        "warmup": 0.05,
        "weight_decay": 0.1,
    },
    "data": {"vocab_size": 4096, "tokenizer_train_stories": 20000, "batch_size": 16},
}
# configs/tiny.yaml as it was sized in steps, before the time budget: 260 steps in float32, four validations.
RECIPE_TINY_260 = {
    "trainer": {"max_steps": 260, "precision": "32-true", "gradient_clip_val": 1.0},
    "model": {
        "config": {"block_size": 256, "embed_dim": 256, "n_heads": 4, "n_layers": 4, "dropout": 0.0},
        "optimizer": "muon",
        "muon_lr": 0.04,
        "schedule": "wsd",
        "learning_rate": 6.0e-3,
        "min_lr": 6.0e-4,
        "warmup": 0.05,
        "weight_decay": 0.1,
    },
    "data": {"vocab_size": 4096, "tokenizer_train_stories": 20000, "batch_size": 16},
}
# Changes to the reference recipe, one each (a dotted key: its value).
CANDIDATES: dict[str, dict[str, object]] = {
    "0.1.0": {},
    "fp32": {"trainer.precision": "32-true"},
    "muon": {"model.optimizer": "muon"},
    "muon-lr0.01": {"model.optimizer": "muon", "model.muon_lr": 0.01},
    "muon-lr0.04": {"model.optimizer": "muon", "model.muon_lr": 0.04},
    "wsd": {"model.schedule": "wsd"},
    "lr2e-3": {"model.learning_rate": 2e-3, "model.min_lr": 2e-4},
    "lr4e-3": {"model.learning_rate": 4e-3, "model.min_lr": 4e-4},
    "swiglu": {"model.config.mlp": "swiglu"},
    "relu2": {"model.config.mlp": "relu2"},
    "rmsnorm": {"model.config.norm_type": "rmsnorm"},
    "qk_norm": {"model.config.qk_norm": True},
    "untied": {"model.config.tie_embeddings": False},
    "gqa": {"model.config.n_kv_heads": 2},
    "batch8": {"data.batch_size": 8},
    "batch32": {"data.batch_size": 32},
    "deeper": {"model.config.n_layers": 6, "model.config.embed_dim": 192, "model.config.n_heads": 3},
    "wider": {"model.config.n_layers": 2, "model.config.embed_dim": 384, "model.config.n_heads": 6},
    "dropout0.1": {"model.config.dropout": 0.1},
    "dropout0.2": {"model.config.dropout": 0.2},
    "wd0.3": {"model.weight_decay": 0.3},  # AdamW's decay: under Muon, an untied head's alone
    "muon-wd0.1": {"model.muon_weight_decay": 0.1},
}
WSD_MUON = {"model.schedule": "wsd", "model.optimizer": "muon", "model.muon_lr": 0.04}
MODERN = {"model.config.mlp": "relu2", "model.config.tie_embeddings": False, "model.config.qk_norm": True}
# The modern block in a shape that exports (Qwen3ForCausalLM): SwiGLU and RMSNorm instead of ReLU² and LayerNorm.
QWEN3 = {**MODERN, "model.config.mlp": "swiglu", "model.config.norm_type": "rmsnorm", "model.config.bias": False}
CANDIDATES |= {  # the changes that helped, together
    "wsd+muon": WSD_MUON,
    "wsd+muon+lr2e-3": {**WSD_MUON, "model.learning_rate": 2e-3, "model.min_lr": 2e-4},
    "wsd+muon+lr3e-3": {**WSD_MUON, "model.learning_rate": 3e-3, "model.min_lr": 3e-4},
    "wsd+muon+lr4e-3": {**WSD_MUON, "model.learning_rate": 4e-3, "model.min_lr": 4e-4},
    "wsd+muon+lr6e-3": {**WSD_MUON, "model.learning_rate": 6e-3, "model.min_lr": 6e-4},
    "wsd0.4+muon+lr4e-3": {**WSD_MUON, "model.decay_fraction": 0.4, "model.learning_rate": 4e-3, "model.min_lr": 4e-4},
    "wsd+muon0.06+lr3e-3": {**WSD_MUON, "model.muon_lr": 0.06, "model.learning_rate": 3e-3, "model.min_lr": 3e-4},
    "wsd+muon+modern": {**WSD_MUON, **MODERN},
    "wsd+muon+modern+lr2e-3": {**WSD_MUON, **MODERN, "model.learning_rate": 2e-3, "model.min_lr": 2e-4},
    "wsd+muon+modern+lr3e-3": {**WSD_MUON, **MODERN, "model.learning_rate": 3e-3, "model.min_lr": 3e-4},
    "wsd+muon+qwen3+lr2e-3": {**WSD_MUON, **QWEN3, "model.learning_rate": 2e-3, "model.min_lr": 2e-4},
}


def recipe(name: str, reference: dict) -> dict:
    """The full settings of a candidate: "0.1.0", "tiny" (configs/tiny.yaml), or the reference changed."""
    if name == "0.1.0":
        return json.loads(json.dumps(RECIPE_0_1_0))
    if name == "tiny-260":
        return json.loads(json.dumps(RECIPE_TINY_260))
    if name.split("+")[0] == "tiny":  # tiny, or tiny+<candidate>: configs/tiny.yaml changed as the candidate says
        settings = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
        settings = {k: settings[k] for k in ("trainer", "model", "data") if k in settings}
        name = name.partition("+")[2]
    else:
        settings = json.loads(json.dumps(reference))
    for key, value in CANDIDATES.get(name, {}).items():
        *path, last = key.split(".")
        node = settings
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return settings


def write_run_config(
    work: Path, name: str, settings: dict, seed: int, steps: int | None = None, minutes: float | None = None
) -> Path:
    """A run's config: ``steps`` optimizer steps, or a time budget of ``minutes`` planned by gptlit (the
    candidate's own ``max_steps``, when it has one, wins over both); one validation, at the end."""
    trainer = {k: v for k, v in settings["trainer"].items() if k not in ("callbacks", "max_time")}
    steps = trainer.pop("max_steps", steps)
    once = steps or 10**9  # validation and checkpoint: at the end only (the fit's last validation, last.ckpt)
    hours, seconds = divmod(round(60 * (minutes or 0)), 3600)
    max_time = f"00:{hours:02d}:{seconds // 60:02d}:{seconds % 60:02d}"
    limits = {"max_steps": steps} if steps else {"max_steps": -1, "max_time": max_time}
    config = {
        "seed_everything": seed,
        "trainer": {
            **trainer,
            **limits,
            "val_check_interval": once,  # the score comes from the full split below
            "limit_val_batches": 1,
            "check_val_every_n_epoch": None,
            "log_every_n_steps": 10,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [],
        },
        "model": settings["model"],
        "data": {
            **settings["data"],
            "source": str(CORPUS),
            "data_dir": str(work / f"data-{settings['data']['vocab_size']}"),
            "val_fraction": VAL_FRACTION,
            "num_workers": 0,
        },
        "checkpoint": {"every_n_train_steps": once},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def contains(saved: object, wanted: object) -> bool:
    """Whether a run's saved config holds every setting of ``wanted`` (the saved one also lists the defaults)."""
    if isinstance(wanted, dict):
        return isinstance(saved, dict) and all(contains(saved.get(k), v) for k, v in wanted.items())
    return saved == wanted or (isinstance(wanted, (list, tuple)) and list(saved or []) == list(wanted))


def finished(run: Path, config: Path) -> bool:
    """Whether ``run`` already trained to the end with the settings of ``config`` (its own config.yaml matches):
    its steps, or the last step its time budget planned."""
    saved, last = run / "config.yaml", run / "checkpoints" / "last.ckpt"
    wanted = yaml.safe_load(config.read_text())
    if not (saved.exists() and last.exists()):
        return False
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    plan = checkpoint.get("callbacks", {}).get("TimeBudget", {}).get("plan") or {}
    trainer = wanted["trainer"]
    budgeted = trainer["max_steps"] <= 0
    if budgeted and plan.get("decay_start") is None:  # stopped before its plan was final
        return False
    if checkpoint["global_step"] != (plan.get("total") if budgeted else trainer["max_steps"]):
        return False
    wanted["trainer"] = {k: trainer[k] for k in ("max_steps", "max_time", "precision") if k in trainer}
    return contains(yaml.safe_load(saved.read_text()), wanted)


def fit(work: Path, run: str, config: Path, reuse: bool = False) -> Path:
    """Train in a fresh process (or, with ``reuse``, keep a finished run of the same settings); returns the run
    directory."""
    if reuse and finished(work / "lightning_logs" / run, config):
        return work / "lightning_logs" / run
    command = [sys.executable, "-m", "gptlit", "fit", "--config", str(config), "--run_name", run, "--overwrite", "true"]
    subprocess.run(command, cwd=work, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return work / "lightning_logs" / run


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def run_figures(run: Path) -> tuple[int, float]:
    """(steps, minutes) of a run: its optimizer steps, and its training time (Lightning's ``Timer`` under a time
    budget, validation and checkpoints included; ThroughputMonitor's otherwise, validation excluded)."""
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    timer = checkpoint.get("callbacks", {}).get("Timer", {}).get("time_elapsed", {})
    seconds = timer.get("train") or scalars(run)["train/time"][-1][1]
    return checkpoint["global_step"], seconds / 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=["tokens", "minutes"], default="tokens")
    parser.add_argument("--minutes", type=float, default=10.0, help="the minutes budget's training time")
    parser.add_argument("--passes", type=float, default=1.0, help="the tokens budget, in passes over the split")
    parser.add_argument(
        "--candidates",
        nargs="+",
        default=list(CANDIDATES),
        help=f"of {', '.join(CANDIDATES)}, tiny, tiny-260, tiny+<one of them>",
    )
    parser.add_argument("--reference", default="fp32", help="the candidate the others change one thing of")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "gptlit-recipe")
    parser.add_argument("--write", action="store_true", help="record the table in benchmarks/README.md")
    parser.add_argument("--fresh", action="store_true", help="train again runs that --work already holds")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    reference = recipe(args.reference, RECIPE_0_1_0) if args.reference != "0.1.0" else RECIPE_0_1_0
    rows, results = [], {}
    for name in args.candidates:
        settings = recipe(name, reference)
        tokens_per_step = settings["data"]["batch_size"] * settings["model"]["config"]["block_size"]
        bpbs, steps, minutes = [], [], []
        for seed in args.seeds:
            if args.budget == "minutes":
                config = write_run_config(args.work, name, settings, seed, minutes=args.minutes)
            else:
                config = write_run_config(args.work, name, settings, seed, steps=pass_steps(args, name, settings))
            tag = "" if "max_steps" in settings["trainer"] else budget_tag(args)  # steps of its own: any budget
            run = fit(args.work, f"{name}{tag}-{seed}", config, reuse=not args.fresh)
            data_dir = args.work / f"data-{settings['data']['vocab_size']}"
            bpbs.append(score(run, data_dir))
            run_steps, run_minutes = run_figures(run)
            steps.append(run_steps)
            minutes.append(run_minutes)
            print(f"{name} seed {seed}: {steps[-1]} steps, {minutes[-1]:.2f} min, val bpb {bpbs[-1]:.4f}", flush=True)
        results[name] = statistics.mean(bpbs)
        first = results[args.candidates[0]]
        per_seed = " / ".join(f"{b:.4f}" for b in bpbs)
        figures = [f"{statistics.mean(minutes):.2f}", per_seed, f"{results[name]:.4f}", f"{results[name] / first:.3f}"]
        mean_steps = round(statistics.mean(steps))
        rows.append([name, " / ".join(map(str, steps)), f"{mean_steps * tokens_per_step:,}", *figures])
    table = markdown_table(
        ["recipe", "steps per seed", "tokens (mean)", "train min", "val bpb per seed", "mean", "vs first"], rows
    )
    budget = f"{args.minutes:g} minutes of training" if args.budget == "minutes" else f"{args.passes:g} pass(es)"
    report = (
        f"`python benchmarks/recipe.py --budget {args.budget}`: {budget} on the TinyStories slice, seeds "
        f"{', '.join(map(str, args.seeds))}, 10% of its stories held out and scored whole; each candidate changes "
        f"the `{args.reference}` recipe as its name says.\nMachine: {machine()}.\n\n{table}\n"
    )
    print(report)
    if args.write:
        seeds = f"seed{'s' if len(args.seeds) > 1 else ''} {' '.join(map(str, args.seeds))}"
        write_section(f"Recipes: {budget}, {seeds}", report)


def budget_tag(args: argparse.Namespace) -> str:
    """What tells a run's name from other budgets' runs of the same candidate (none for one pass)."""
    if args.budget == "minutes":
        return f"-{args.minutes:g}min"
    return "" if args.passes == 1 else f"-{args.passes:g}passes"


def pass_steps(args: argparse.Namespace, name: str, settings: dict) -> int:
    """Optimizer steps of ``--passes`` passes over the training split."""
    tokens_per_step = settings["data"]["batch_size"] * settings["model"]["config"]["block_size"]
    data_dir = args.work / f"data-{settings['data']['vocab_size']}"
    if not (data_dir / "meta.json").exists():  # prepare it with a first, tiny run
        fit(args.work, f"{name}-prepare", write_run_config(args.work, name, settings, seed=0, steps=1))
    train_tokens = read_meta(data_dir)["splits"]["train"]["tokens"]
    return max(10, round(args.passes * train_tokens / tokens_per_step))


if __name__ == "__main__":
    main()
