"""The matrix products of a decoding pass, in the form its CPU runs fastest for their number of rows.

A decoding pass multiplies a few rows (one per token fed: 1 to 9 at batch 1) by each weight matrix, and reads every
weight to do so. ``x Wᵀ + b`` can be had in several forms, equal up to rounding, that the matrix library runs by
different kernels, and which is fastest depends on the CPU, its library and the row count: on a 2-core AMD EPYC
(MKL 2024.2), the tiny model's 17 matrices in turn took, for 1 row, 2.5 ms as ``F.linear(x, W, b)``, 1.7 ms as
``x @ Wt`` (the weights transposed once per decoding) and 2.5 ms as ``W @ xᵀ``; for 2 rows 4.2, 1.5 and 0.8 ms.
`Products` tries the forms in the first passes of each row count, timing each product in its pass (the weights as
a pass leaves them in the CPU's caches), and multiplies by the fastest from then on: once per process and
architecture, at the cost of a few passes in slower forms.

Passes of more than `MOST_ROWS` rows (prefills, long drafts) use ``F.linear``, as `GPT.forward` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from time import perf_counter

import torch
import torch.nn.functional as F

from gptlit.errors import UsageError

Layer = tuple[torch.Tensor, torch.Tensor | None]  # a linear layer's weight (N, K) and bias (N,) or None
MOST_ROWS = 16


def _transposed(x: torch.Tensor, w: torch.Tensor, wt: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return x @ wt if b is None else torch.addmm(b, x, wt)  # x (M, K) @ Wᵀ (K, N), stored contiguous


def _weight_first(x: torch.Tensor, w: torch.Tensor, wt: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return (w @ x.T if b is None else torch.addmm(b.unsqueeze(1), w, x.T)).T  # (W (N, K) @ xᵀ (K, M))ᵀ


# The forms of x Wᵀ + b, each through another kernel: "linear" is F.linear(x, W, b) as the model's layers run it, on
# x (..., K); the others, on x (M, K), are below.
FORMS = ("linear", "transposed", "weight-first")
_OTHER_FORMS: dict[str, Callable[..., torch.Tensor]] = {"transposed": _transposed, "weight-first": _weight_first}

# What the passes of each row count have measured, for each architecture in this process:
# (device, dtype, threads, the layers' shapes) -> {rows: _Trial}
_TRIALS: dict[tuple, dict[int, _Trial]] = {}


@dataclass
class _Trial:
    """The forms tried on passes of one row count: pass p uses form p % 3; passes 3 to 5 are timed (0 to 2 warm up:
    the first call of a kernel and the weights' transposition), and the fastest form serves every later pass."""

    calls: int = 0  # products so far, `Products.layers` of them a pass
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(FORMS, 0.0))
    fastest: str | None = None


class Products:
    """The products ``x Wᵀ + b`` of one decoding's linear layers, a pass calling each layer once, in order.

    Args:
        layers: Each layer's weight and bias, in the order a pass uses them.
        form: ``"fastest"``: try the forms and use the fastest for each row count, on a CPU in float32 (a GPU, or
            another precision, multiplies by ``F.linear``); or one of `FORMS` for every product: ``"linear"`` is bit
            for bit the model's own layers.
    """

    def __init__(self, layers: list[Layer], form: str = "fastest") -> None:
        if form != "fastest" and form not in FORMS:
            raise UsageError(f"form must be 'fastest' or one of {list(FORMS)}, got {form!r}")
        self.layers = layers
        self._transposed: list[torch.Tensor] | None = None
        weight = layers[0][0]
        measure = form == "fastest" and weight.device.type == "cpu" and weight.dtype == torch.float32
        self.fixed = "linear" if form == "fastest" else form  # where nothing is measured
        shapes = tuple((tuple(w.shape), b is not None) for w, b in layers)
        self.key = (weight.device, weight.dtype, torch.get_num_threads(), shapes)
        self.trials = _TRIALS.setdefault(self.key, {}) if measure else None

    def layer(self, index: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Layer ``index``'s product: x (..., K) to (..., N)."""
        return partial(self, index)

    def __call__(self, index: int, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.size(-1)
        if self.trials is None or rows > MOST_ROWS:
            return self.product(self.fixed, index, x)
        trial = self.trials.get(rows)
        if trial is None:
            trial = self.trials[rows] = _Trial()
        if trial.fastest is not None:
            return self.product(trial.fastest, index, x)
        passes = trial.calls // len(self.layers)
        form = FORMS[passes % len(FORMS)]
        self.transposed()  # made before the clock starts
        began = perf_counter()
        out = self.product(form, index, x)
        if passes >= len(FORMS):
            trial.seconds[form] += perf_counter() - began
        trial.calls += 1
        if trial.calls == 2 * len(FORMS) * len(self.layers):
            trial.fastest = min(trial.seconds, key=trial.seconds.__getitem__)
        return out

    def product(self, form: str, index: int, x: torch.Tensor) -> torch.Tensor:
        """Layer ``index``'s product of x (..., K) in ``form``: (..., N)."""
        w, b = self.layers[index]
        if form == "linear":
            return F.linear(x, w, b)
        rows = x.numel() // x.size(-1)
        out = _OTHER_FORMS[form](x.reshape(rows, x.size(-1)), w, self.transposed()[index], b)  # (rows, N)
        return out.reshape(*x.shape[:-1], w.size(0))

    def form(self, rows: int) -> str | None:
        """The form chosen for products of ``rows`` rows; None while they are still being tried."""
        if self.trials is None or rows > MOST_ROWS:
            return self.fixed
        trial = self.trials.get(rows)
        return None if trial is None else trial.fastest

    def transposed(self) -> list[torch.Tensor]:
        """Each layer's weight transposed (K, N), contiguous: made once per decoding, when a form first needs it."""
        if self._transposed is None:
            self._transposed = [w.detach().t().contiguous() for w, _ in self.layers]
        return self._transposed
