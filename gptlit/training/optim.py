"""Optimizers and learning-rate schedules: AdamW with decay groups, Muon for the blocks' matrices, and the
warmup + cosine and warmup-stable-decay (WSD) schedules, as multipliers of each group's peak rate per step.

Nothing here imports Lightning: `GPTLitModule` (gptlit/training/module.py) builds these in ``configure_optimizers``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import nn

from gptlit.errors import ConfigError

if TYPE_CHECKING:
    from gptlit.model.gpt import GPT

OptimizerName = Literal["adamw", "muon"]
ScheduleName = Literal["cosine", "wsd"]
MuonAdjustLR = Literal["original", "match_rms_adamw"]


def check_choice(option: str, value: Any, names: Any) -> None:
    """Refuse (ConfigError) a ``value`` of ``option`` that is none of the Literal type ``names``: no name quietly
    means another."""
    choices = get_args(names)
    if value not in choices:
        raise ConfigError(f"{option} must be one of {', '.join(choices)}, got {value!r}")


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier at optimizer step ``step``: linear warmup, then cosine to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio)


def count_warmup_steps(warmup: int | float, total_steps: int) -> int:
    """Warmup in optimizer steps: a float is a fraction of all ``total_steps``, an int a step count."""
    return round(warmup * total_steps) if isinstance(warmup, float) else warmup


def wsd_decay_start(warmup_steps: int, total_steps: int, decay_fraction: float) -> int:
    """The first step of the warmup-stable-decay schedule's decay: the first after warmup below the peak rate."""
    return max(warmup_steps, total_steps - max(1, round(decay_fraction * total_steps)))


def wsd_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float, decay_fraction: float) -> float:
    """Warmup-stable-decay: linear warmup, the peak rate, then a linear decay to ``min_ratio`` over the last
    ``decay_fraction`` of all steps (the speedruns' trapezoid)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_start = wsd_decay_start(warmup_steps, total_steps, decay_fraction)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step + 1 - decay_start) / max(1, total_steps - decay_start))  # 1 at the last step
    return 1.0 - progress * (1.0 - min_ratio)


def schedule(name: ScheduleName, decay_fraction: float) -> Callable[[int, int, int, float], float]:
    """The multiplier function of a schedule, as ``f(step, warmup_steps, total_steps, min_ratio)``; ConfigError
    for a name that is not one of `ScheduleName`'s."""
    check_choice("model.schedule", name, ScheduleName)
    if name == "wsd":
        return lambda step, warmup, total, min_ratio: wsd_factor(step, warmup, total, min_ratio, decay_fraction)
    return lr_factor


def parameter_groups(model: GPT) -> dict[str, list[nn.Parameter]]:
    """The model's parameters by how they are optimized, each once (a tied head is the embedding):

    - ``matrices``: the 2-D weights of the linear layers inside the transformer blocks;
    - ``head``: an untied output head;
    - ``no_decay``: the token (and position) embeddings, biases and norm gains.

    Biases and norm gains are offsets and scales whose size is meaningful; the token embedding is left alone
    too, since rows of rare tokens get few gradient updates and decay would pull them towards zero in between.
    """
    groups: dict[str, list[nn.Parameter]] = {"matrices": [], "head": [], "no_decay": []}
    head, token_embedding = getattr(model, "lm_head", None), model.wte.weight
    seen = {id(token_embedding)}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if not (isinstance(module, nn.Linear) and name == "weight"):
                groups["no_decay"].append(param)
            elif module is head:
                groups["head"].append(param)
            else:
                groups["matrices"].append(param)
    # The token embedding last: the order gptlit 0.1.0 saved AdamW's state in, which a resumed run must keep.
    groups["no_decay"].append(token_embedding)
    return groups


def build_adamw(
    model: nn.Module, learning_rate: float, weight_decay: float, betas: tuple[float, float], fused: bool = True
) -> torch.optim.AdamW:
    """AdamW that decays only the weight matrices of linear layers (`parameter_groups`).

    With ``fused``, one kernel (CPU and CUDA) updates all tensors in one pass instead of a loop over them.
    """
    groups = parameter_groups(model)
    decay = [{"params": groups["matrices"] + groups["head"], "weight_decay": weight_decay, "name": "decay"}]
    no_decay = [{"params": groups["no_decay"], "weight_decay": 0.0, "name": "no_decay"}]
    return torch.optim.AdamW(decay + no_decay, lr=learning_rate, betas=betas, fused=_fused(model, fused))


def _fused(model: nn.Module, fused: bool) -> bool | None:
    return (fused and all(p.device.type in ("cpu", "cuda") for p in model.parameters())) or None


def newton_schulz(
    g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """A matrix of g's shape close to the orthogonal factor U V^T of g = U S V^T, by torch.optim.Muon's quintic
    Newton-Schulz iteration, computed in ``dtype``."""
    a, b, c = coefficients
    x = g.to(dtype)
    if g.size(0) > g.size(1):
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if g.size(0) > g.size(1) else x


def shape_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Muon's learning rate for a matrix of ``shape`` (torch.optim.Muon's ``adjust_lr_fn``: None is
    ``original``); ConfigError for a name that is not one of `MuonAdjustLR`'s."""
    if adjust_lr_fn is not None:
        check_choice("model.muon_adjust_lr", adjust_lr_fn, MuonAdjustLR)
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1, rows / cols))


def evaluate(closure: Callable[[], Any] | None) -> Any:
    """The loss of an optimizer step's closure (with gradients on), or None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` with its Newton-Schulz iteration in ``ns_dtype``, and fused matrices taken apart.

    torch runs the iteration in bfloat16 always: right on a GPU, but a CPU without bfloat16 units (AVX2 only)
    runs those products many times slower than float32 ones, so ``build_muon`` chooses float32 on a CPU.
    gptlit fuses q, k and v into one matrix, and a gated MLP's gate and up: ``row_blocks`` names the row
    blocks of such a matrix, each orthogonalized (and its rate scaled) as the matrix it stands for. In bfloat16
    and without row blocks, this step is torch's own, operation for operation.

    Args:
        params: Weight matrices.
        ns_dtype: The dtype of the Newton-Schulz iteration.
        row_blocks: Per fused matrix (by identity), the sizes of its row blocks.
        options: ``torch.optim.Muon``'s options.
    """

    def __init__(
        self,
        params,
        ns_dtype: torch.dtype = torch.bfloat16,
        row_blocks: dict[int, tuple[int, ...]] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(params, **options)
        self.ns_dtype, self.row_blocks = ns_dtype, row_blocks or {}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = evaluate(closure)
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            iteration = (group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                p.mul_(1 - lr * group["weight_decay"])
                blocks = update.split(self.row_blocks[id(p)]) if id(p) in self.row_blocks else (update,)
                start = 0
                for block in blocks:
                    ortho = newton_schulz(block, *iteration)
                    rows = p[start : start + block.size(0)]
                    rows.add_(ortho, alpha=-shape_lr(lr, group["adjust_lr_fn"], block.shape))
                    start += block.size(0)
        return loss


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the blocks' weight matrices and AdamW for every other parameter, as one optimizer.

    Muon (`Muon`, ``torch.optim.Muon``) orthogonalizes each matrix's momentum with a few Newton-Schulz iterations
    before the update; it is meant for the hidden 2-D weights only. The two optimizers share this one's
    parameter groups and state: Lightning, the learning-rate scheduler, gradient clipping and checkpoints
    see a single optimizer, and its ``state_dict`` holds both.

    Args:
        matrices: The weight matrices Muon updates.
        others: AdamW's parameter groups.
        muon: `Muon`'s options (lr, weight_decay, momentum, adjust_lr_fn, ns_dtype, ...).
        adamw: ``torch.optim.AdamW``'s options (lr, betas, fused, ...).
    """

    def __init__(self, matrices: list[nn.Parameter], others: list[dict[str, Any]], muon: dict, adamw: dict) -> None:
        muon_group = {"params": matrices, "name": "muon"}
        # The inner optimizers fill in their defaults and keep these very dicts as their groups.
        self.muon = Muon([muon_group], **muon)
        self.adamw = torch.optim.AdamW(others, **adamw)
        super().__init__([muon_group, *others], defaults={})
        self._share()

    def _share(self) -> None:
        """Point the inner optimizers at this one's groups and state (again after load_state_dict)."""
        self.muon.param_groups = [g for g in self.param_groups if g.get("name") == "muon"]
        self.adamw.param_groups = [g for g in self.param_groups if g.get("name") != "muon"]
        self.muon.state = self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = evaluate(closure)
        self.muon.step()
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._share()


def fused_row_blocks(model: GPT) -> dict[int, tuple[int, ...]]:
    """The row blocks of the model's fused matrices, by parameter identity, as each layer of the blocks declares
    them in its ``row_blocks`` (`gptlit.model.layers`): [q; k; v] of each attention, [gate; up] of a gated MLP.

    Every linear layer must be declared, fused or not, with blocks that add up to its rows: a layer without a
    declaration is refused (TypeError), so that a new fused matrix cannot be orthogonalized as one unnoticed.
    """
    fused = {}
    for module in model.blocks.modules():
        linears = {name: child for name, child in module.named_children() if isinstance(child, nn.Linear)}
        declare = getattr(type(module), "row_blocks", None)
        declared = declare(model.config) if linears and declare is not None else {}
        for name, linear in linears.items():
            rows = declared.get(name)
            if rows is None or sum(rows) != linear.out_features:
                raise TypeError(
                    f"{type(module).__name__}.{name} ({linear.out_features} rows) has no row blocks that add up "
                    f"to its rows in {type(module).__name__}.row_blocks (declared: {rows}): declare its matrices "
                    "there, one block each, so that Muon orthogonalizes them apart"
                )
            if len(rows) > 1:
                fused[id(linear.weight)] = rows
    return fused


def build_muon(
    model: GPT,
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float],
    muon_lr: float,
    muon_momentum: float,
    muon_weight_decay: float,
    muon_adjust_lr: MuonAdjustLR,
    fused: bool = True,
    ns_dtype: torch.dtype | None = None,
) -> MuonAdamW:
    """`MuonAdamW`: Muon at ``muon_lr`` for the blocks' matrices; AdamW at ``learning_rate`` for the head
    (decayed), embeddings, biases and norm gains (not decayed). ``ns_dtype`` (default: bfloat16 on a GPU,
    float32 on a CPU) is the dtype of Muon's Newton-Schulz iteration."""
    groups = parameter_groups(model)
    others = [
        {"params": groups["head"], "weight_decay": weight_decay, "name": "head"},
        {"params": groups["no_decay"], "weight_decay": 0.0, "name": "no_decay"},
    ]
    if ns_dtype is None:
        ns_dtype = torch.bfloat16 if next(model.parameters()).is_cuda else torch.float32
    muon = {"lr": muon_lr, "momentum": muon_momentum, "weight_decay": muon_weight_decay,
            "adjust_lr_fn": muon_adjust_lr, "ns_dtype": ns_dtype, "row_blocks": fused_row_blocks(model)}  # fmt: skip
    adamw = {"lr": learning_rate, "betas": betas, "fused": _fused(model, fused)}
    return MuonAdamW(groups["matrices"], [g for g in others if g["params"]], muon, adamw)
