"""``trainer.precision: auto``: the precision that fits the machine, resolved before the Trainer is built.

On CUDA: ``bf16-mixed`` where the GPU supports bfloat16, else ``16-mixed``. On a CPU: ``bf16-mixed`` only where it
has bfloat16 units (AMX-BF16 or AVX512-BF16 among /proc/cpuinfo's flags; without that file, a short measurement
of a bfloat16 against a float32 matrix product decides), else ``32-true``: bfloat16 on a CPU without them is many
times slower than float32.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.connector import _PRECISION_INPUT

from gptlit.cli.run_config import is_rank_zero

AUTO = "auto"
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str] | None:
    """The CPU's feature flags (the first ``flags`` line of ``cpuinfo``), or None where there is no such file."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


def bf16_matmul_is_faster(size: int = 512, repeats: int = 3) -> bool:
    """Whether a bfloat16 matrix product on this CPU takes less time than the float32 one (the best of a few)."""

    def best(dtype: torch.dtype) -> float:
        a = torch.randn(size, size).to(dtype)
        a @ a  # the first call sets up the kernel
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.bfloat16) < best(torch.float32)


def auto_precision(accelerator: Any = "auto", flags: set[str] | Literal["read"] | None = "read") -> tuple[str, str]:
    """(precision, why) for ``trainer.precision: auto`` on ``accelerator`` (``flags``: the CPU's, read from
    /proc/cpuinfo unless given; None: unknown)."""
    on_cuda = accelerator in ("auto", "gpu", "cuda", None) and torch.cuda.is_available()
    if on_cuda:
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", "the GPU supports bfloat16"
        return "16-mixed", "the GPU has no bfloat16: float16 with loss scaling"
    if accelerator not in ("auto", "cpu", None):
        return "32-true", f"auto chooses on CUDA and CPUs only, not for accelerator {accelerator!r}"
    flags = cpu_flags() if flags == "read" else flags
    if flags is None:
        if bf16_matmul_is_faster():
            return "bf16-mixed", "a bfloat16 matrix product is faster than a float32 one on this CPU"
        return "32-true", "a bfloat16 matrix product is slower than a float32 one on this CPU"
    found = [flag for flag in BF16_CPU_FLAGS if flag in flags]
    if found:
        return "bf16-mixed", f"the CPU has bfloat16 units ({', '.join(found)})"
    capability = torch.backends.cpu.get_cpu_capability()
    return "32-true", f"the CPU ({capability}) has no bfloat16 units (no {' or '.join(BF16_CPU_FLAGS)})"


class GPTLitTrainer(L.Trainer):
    """Lightning's Trainer, with ``precision: auto`` (gptlit's default remains Lightning's, ``32-true``).

    Args:
        precision: As Lightning's, or ``auto``: the precision that fits the machine (`auto_precision`), said in
            one line.
    """

    def __init__(self, *, precision: _PRECISION_INPUT | Literal["auto"] | None = None, **kwargs: Any) -> None:
        if precision == AUTO:
            precision, why = auto_precision(kwargs.get("accelerator", "auto"))
            if is_rank_zero():
                print(f"gptlit: trainer.precision auto: {precision}, since {why}", file=sys.stderr, flush=True)
        super().__init__(precision=precision, **kwargs)
