"""gptlit checkpoints: read weights-only, checked, and migrated from the formats of earlier gptlit versions.

A gptlit checkpoint is a Lightning checkpoint with one more entry, ``gptlit``:
``{"format": CHECKPOINT_FORMAT, "config": GPTConfig fields, "tokenizer": the tokenizer's JSON}``, and from a
training run its latest validation ``metrics`` and ``total_steps`` (the run's length, or None). The model's
weights are the ``state_dict`` entries under ``model.``.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import torch

from gptlit.errors import MissingFileError, UsageError

# 1: gptlit 0.1.0. 2: the model variants (mlp, mlp_hidden, n_kv_heads, qk_norm, tie_embeddings), and the
# module's hyperparameters with the model's shape nested under "config".
CHECKPOINT_FORMAT = 2
MODEL_PREFIX = "model."
# What the fields added in format 2 meant in format 1: a GPT-NeoX-like model.
# gptlit 0.1.0's model fields, which its checkpoints kept beside the module's other settings.
FORMAT_1_FIELDS = {
    *("vocab_size", "block_size", "embed_dim", "n_heads", "n_layers", "dropout", "use_rope", "norm_type", "bias"),
    "rope_base",
}
GIVE_A_CHECKPOINT = "give a .ckpt file, or 'last', 'best' or 'stable'"
FORMAT_1_MEANING = {"mlp": "gelu", "mlp_hidden": None, "n_kv_heads": None, "qk_norm": False, "tie_embeddings": True}


def read_checkpoint(path: str | Path, optimizer: bool = False) -> dict[str, Any]:
    """Load a gptlit checkpoint weights-only: a pickle that would run code is refused, never executed.

    A checkpoint of an earlier format is migrated in memory; one of a later format than this gptlit
    reads is refused, and so is one whose weights (with ``optimizer``, also its optimizer state, which a
    resumed run continues from) hold a NaN or an infinity.
    """
    path = existing_checkpoint(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")  # what it would run
        raise UsageError(
            f"refusing to load {path}: it holds pickled objects that are not plain tensors and could run code "
            f"({reason}); only load checkpoints written by gptlit"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise UsageError(f"{path} is not a readable checkpoint ({err}); it may be truncated") from None
    if not isinstance(checkpoint, dict) or "gptlit" not in checkpoint:
        raise UsageError(f"{path} is not a gptlit checkpoint (it has no 'gptlit' entry); train one with gptlit fit")
    problem = describe_non_finite(checkpoint, optimizer)
    if problem:
        raise UsageError(
            f"refusing to load {path}: {problem}, so training had diverged when it was saved; use a checkpoint "
            "saved before (such as --ckpt_path best), or train again with a lower model.learning_rate"
        )
    return migrate_checkpoint(checkpoint, path)


def existing_checkpoint(path: str | Path, hint: str = GIVE_A_CHECKPOINT) -> Path:
    """``path`` when it is a file; otherwise MissingFileError, ``checkpoint not found: <path>; <hint>``."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}; {hint}")
    return path


def check_same_shape(
    checkpoint: dict[str, Any], config: dict[str, Any], path: str | Path, data_vocab_size: int | None = None
) -> None:
    """Refuse to load a checkpoint into a model of another shape (UsageError), naming the first field that differs.

    ``config`` holds the model's fields (``model.config.*``); fields it lacks are not compared. When ``config``
    lacks ``vocab_size`` (the command line links it from the data module when the classes are built), the
    configured ``data_vocab_size`` is checked in its place.
    """
    saved = checkpoint["gptlit"].get("config") or {}
    asked = {**config, "vocab_size": data_vocab_size} if data_vocab_size is not None else config
    for name, value in saved.items():
        if name in asked and asked[name] != value:
            group = "data" if name == "vocab_size" else "model.config"
            raise UsageError(
                f"{path} holds a model with {name}={value}, but the config asks for {name}={asked[name]}; "
                f"resume with the run's own config, or set {group}.{name}: {value}"
            )


def describe_non_finite(checkpoint: dict[str, Any], optimizer: bool = True) -> str | None:
    """Which floating-point tensors of a checkpoint's weights (``state_dict``) and, with ``optimizer``, of its
    optimizer states hold a NaN or an infinity, in words; None when every one is finite."""
    weights = floating_tensors(checkpoint.get("state_dict", {}))
    states: dict[str, torch.Tensor] = {}
    for i, saved in enumerate(checkpoint.get("optimizer_states", []) if optimizer else []):
        for param, state in (saved.get("state") or {}).items():
            states.update({f"optimizer_states[{i}][{param}].{k}": v for k, v in floating_tensors(state).items()})
    bad_weights, bad_states = non_finite_names(weights), non_finite_names(states)
    if not bad_weights and not bad_states:
        return None
    named = bad_weights + bad_states
    listed = ", ".join(named[:3]) + (f" and {len(named) - 3} more" if len(named) > 3 else "")
    counts = [f"{len(bad_weights)} of {len(weights)} weight tensors"]
    if optimizer:
        counts.append(f"{len(bad_states)} of {len(states)} optimizer tensors")
    return f"{' and '.join(counts)} hold NaN or inf ({listed})"


def floating_tensors(state: Any) -> dict[str, torch.Tensor]:
    """The non-empty floating-point tensors of a dict, by key."""
    items = state.items() if isinstance(state, dict) else ()
    return {str(k): v for k, v in items if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()}


# Dtypes whose largest magnitude torch._foreach_norm computes; others are checked with isfinite.
NORM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@torch.no_grad()
def non_finite_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the tensors that hold a NaN or an infinity, in their order.

    One fused reduction per device and dtype: the largest magnitude of each tensor, which is NaN or infinite
    exactly when the tensor holds such a value (it never overflows, as a sum of squares would), and one
    synchronization per group.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
    for name, tensor in tensors.items():
        groups.setdefault((tensor.device, tensor.dtype), []).append(name)
    bad = set()
    for (_, dtype), names in groups.items():
        group = [tensors[name] for name in names]
        if dtype in NORM_DTYPES:
            finite = torch.isfinite(torch.stack(torch._foreach_norm(group, ord=math.inf)))
        else:
            finite = torch.stack([torch.isfinite(t).all() for t in group])
        bad.update(name for name, ok in zip(names, finite.tolist(), strict=True) if not ok)
    return [name for name in tensors if name in bad]


def migrate_checkpoint(checkpoint: dict[str, Any], path: str | Path = "the checkpoint") -> dict[str, Any]:
    """Bring a checkpoint's ``gptlit`` entry to ``CHECKPOINT_FORMAT`` (in place); refuse a newer format."""
    saved = checkpoint["gptlit"]
    version = saved.get("format", 1) if isinstance(saved, dict) else None
    if not isinstance(version, int) or version < 1:
        raise UsageError(f"{path} has a malformed 'gptlit' entry (format {version!r}); it was not written by gptlit")
    if version > CHECKPOINT_FORMAT:
        raise UsageError(
            f"{path} is of checkpoint format {version}, newer than this gptlit reads ({CHECKPOINT_FORMAT}); "
            "upgrade gptlit (pip install -U gptlit) to load it"
        )
    if version == 1:
        saved["config"] = {**FORMAT_1_MEANING, **saved.get("config", {})}
        if isinstance(checkpoint.get("hyper_parameters"), dict):
            checkpoint["hyper_parameters"] = nest_model_config(checkpoint["hyper_parameters"])
        for optimizer in checkpoint.get("optimizer_states", []):  # 0.1.0's AdamW: its groups, named as now
            for group, name in zip(optimizer.get("param_groups", []), ("decay", "no_decay"), strict=False):
                group.setdefault("name", name)
    saved["format"] = CHECKPOINT_FORMAT
    return checkpoint


def nest_model_config(settings: dict[str, Any]) -> dict[str, Any]:
    """gptlit 0.1.0's flat ``model`` settings with the model's shape moved under ``config`` (a new dict)."""
    fields = FORMAT_1_FIELDS
    flat = {k: v for k, v in settings.items() if k != "peak_flops"}  # gone: ThroughputMonitor measures MFU
    nested = {k: v for k, v in flat.items() if k not in fields}
    shape = {k: v for k, v in flat.items() if k in fields}
    if shape:
        nested["config"] = {**shape, **(flat.get("config") or {})}
    return nested


def model_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The GPT's own state_dict out of a Lightning checkpoint of a GPTLitModule."""
    state = checkpoint["state_dict"]
    return {k[len(MODEL_PREFIX) :]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}


def tokenizer_json(checkpoint: dict[str, Any], path: str | Path = "the checkpoint") -> str:
    """The serialized tokenizer a checkpoint carries."""
    serialized = checkpoint["gptlit"].get("tokenizer")
    if not serialized:
        raise UsageError(f"{path} carries no tokenizer; it was saved without a data module")
    return serialized
