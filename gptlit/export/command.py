"""``python -m gptlit export``: a checkpoint as a Hugging Face transformers directory, of the architecture that is
exactly the model (`gptlit.export.architectures`: GPT-NeoX, GPT-2, Llama or Qwen3), with a short model card.

The directory loads with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``
without gptlit installed. It is written beside ``out_dir`` and swapped in whole (`gptlit.export.swap`): however the
export ends, even killed, ``out_dir`` holds the complete previous export or the complete new one (where the system
cannot exchange two directories in one step, as Linux's local file systems can, a kill between the two renames
that stand in for it leaves the previous export beside ``out_dir``, and the next export puts it back).
``--overwrite`` replaces a previous export only (the files of ``EXPORT_FILES``), never a directory holding others.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from gptlit.checkpoint import read_checkpoint, tokenizer_json
from gptlit.data.tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, Tokenizer
from gptlit.errors import UsageError
from gptlit.export.architectures import ARCHITECTURES, hf_config_dict, hf_model_type, to_hf_state_dict
from gptlit.export.swap import clean_beside, staged, swap_in
from gptlit.model.gpt import GPT
from gptlit.training.runs import find_checkpoint

# What an export writes (gptlit 0.1.0 wrote all but README.md): --overwrite replaces a directory of these only.
EXPORT_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "README.md",
    }
)
CARD_TITLE = "# A gptlit model\n"


def write_hf_dir(model, tokenizer, out_dir: Path) -> None:
    """Write config, weights (safetensors) and tokenizer files of ``model`` into ``out_dir``."""
    config = model.config
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    hf_config = hf_config_dict(config, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps(ids, indent=2))
    weights = to_hf_state_dict(model.state_dict(), config)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    shutil.copymode(out_dir / "config.json", out_dir / "model.safetensors")  # safetensors writes 0600: the umask's
    bos_first = HFTokenizer.from_str(tokenizer.to_str())
    # gptlit reads a prompt as <bos> + text, as the model was trained: so does the exported tokenizer.
    bos_first.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, tokenizer.bos_id)]
    )
    bos_first.save(str(out_dir / "tokenizer.json"))
    specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config.block_size,
        "add_bos_token": True,  # for tokenizer classes that read it; tokenizer.json's post-processor does it
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))


def export(
    ckpt_path: str,
    out_dir: str,
    overwrite: bool = False,
    run_name: str | None = None,
    root_dir: str = ".",
) -> None:
    """Export a checkpoint to a Hugging Face transformers directory (GPT-NeoX, GPT-2, Llama or Qwen3, whichever
    is exactly the model; other variants are refused).

    Args:
        ckpt_path: A ``.ckpt`` file, or ``last`` / ``best`` of a run (the most recent run unless --run_name).
        out_dir: The directory to write; it must not exist yet (or be empty) unless --overwrite.
        overwrite: Replace ``out_dir`` if it holds a previous export, and only then: a directory holding any
            other file is refused and left as it is.
        run_name: The run whose ``last``/``best`` checkpoint to use.
        root_dir: The directory holding ``lightning_logs/``.
    """
    target = Path(out_dir)
    for part in (target, *target.parents):
        if part.exists() and not part.is_dir():
            raise UsageError(f"--out_dir {target}: {part} is a file, not a directory; choose another --out_dir")
    place = target.resolve()  # `.` too has a name and a parent to stage beside
    if place.parent.is_dir():
        clean_beside(place)  # first: a previous export that a killed export moved aside goes back to `place`
        _remove_legacy_staging(place)
    _check_out_dir(target, place, overwrite)
    path = find_checkpoint(ckpt_path, root_dir, run_name)
    checkpoint = read_checkpoint(path)
    model, tokenizer = GPT.from_checkpoint(checkpoint).eval(), Tokenizer.from_str(tokenizer_json(checkpoint, path))
    architecture = ARCHITECTURES[hf_model_type(model.config)]  # refuses a variant no architecture is, first
    place.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and swapped in whole: `place` holds the complete old or new export at every
    # instant, and the staging directory is removed however the export ends (gptlit.export.swap).
    with staged(place) as staging:
        write_hf_dir(model, tokenizer, staging)
        (staging / "README.md").write_text(model_card(checkpoint, model.config, architecture))
        swap_in(staging, place)
    print(f"exported {path} to {target} ({architecture})")


def foreign_entries(directory: Path) -> list[str]:
    """What in ``directory`` an export does not write: other names, subdirectories (``name/``), links, and a
    ``README.md`` that is not gptlit's model card."""
    foreign = []
    for entry in sorted(directory.iterdir()):
        if entry.name not in EXPORT_FILES or entry.is_symlink() or not entry.is_file():
            foreign.append(entry.name + ("/" if entry.is_dir() and not entry.is_symlink() else ""))
        elif entry.name == "README.md" and not _is_model_card(entry):
            foreign.append("README.md (not gptlit's model card)")
    return foreign


def _is_model_card(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(CARD_TITLE)) == CARD_TITLE.encode()


def _check_out_dir(target: Path, place: Path, overwrite: bool) -> None:
    """Refuse an ``out_dir`` that holds files, unless --overwrite and they are a previous export."""
    if not place.is_dir() or not any(place.iterdir()):
        return
    if not overwrite:
        raise UsageError(f"{target} exists and is not empty; choose another --out_dir or pass --overwrite true")
    foreign = foreign_entries(place)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UsageError(
            f"--out_dir {target} holds files that are not a gptlit export ({shown}), and --overwrite replaces "
            "only a previous export; nothing was changed: choose another --out_dir, or move them away first"
        )


def _remove_legacy_staging(place: Path) -> None:
    """Remove the staging directories that gptlit 0.1.0 and 0.2.0 left beside ``place`` when killed
    (``.<name>-<8 characters>``, from tempfile.mkdtemp), when they hold nothing but export files."""
    pattern = re.compile(re.escape(f".{place.name}-") + "[a-z0-9_]{8}")
    for entry in place.parent.iterdir():
        if pattern.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink() and not foreign_entries(entry):
            shutil.rmtree(entry, ignore_errors=True)


def model_card(checkpoint: dict, config, architecture: str) -> str:
    """A short README.md: what the model is, how far it was trained, how to load it."""
    metrics = dict(checkpoint["gptlit"].get("metrics") or {})
    if not metrics:  # saved before its run's first validation ended: the best one, as best.ckpt's state has it
        best = [s for key, s in checkpoint.get("callbacks", {}).items() if key.startswith("ModelCheckpoint")]
        if best and best[0].get("best_model_score") is not None:
            metrics[f"{best[0]['monitor']} (best)"] = float(best[0]["best_model_score"])
    scores = ", ".join(f"{name} {value:.4f}" for name, value in sorted(metrics.items())) or "not recorded"
    fields = "\n".join(f"| {name} | {value} |" for name, value in config.to_dict().items())
    return f"""{CARD_TITLE}
A {architecture} exported by gptlit,
trained for {checkpoint.get("global_step", 0):,} optimizer steps.
Last validation: {scores} (bpb: bits per byte of text, comparable across tokenizers).

```python
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

model = AutoModelForCausalLM.from_pretrained(".")  # this directory
tokenizer = AutoTokenizer.from_pretrained(".")  # adds <bos> first, as the model was trained
print(pipeline("text-generation", model=model, tokenizer=tokenizer)("Once upon a time", max_new_tokens=100)[0])
```

| gptlit config | value |
| --- | --- |
{fields}
"""
