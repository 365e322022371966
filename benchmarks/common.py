"""Shared pieces of the benchmarks: the machine, interleaved timing, matmul peaks, and README sections."""

from __future__ import annotations

import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

README = Path(__file__).parent / "README.md"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{torch.get_num_threads()} CPU threads"
    return f"{cpu}, {device}, torch {torch.__version__}, Python {platform.python_version()}"


def matmul_peak(dtype: torch.dtype, device: str = "cpu", n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n matmul in ``dtype``: the ceiling that MFU is measured against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)


def rate(fn: Callable[[], object], count: int) -> Callable[[], float]:
    """A runner for `interleaved`: calls ``fn`` and returns ``count`` (its tokens) per second of it."""

    def run() -> float:
        start = time.perf_counter()
        fn()
        return count / (time.perf_counter() - start)

    return run


def interleaved(runners: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Call each runner in turn, ``repeats`` rounds; the median of what each returned (a rate)."""
    results: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            results[name].append(run())
    return {name: statistics.median(values) for name, values in results.items()}


def write_section(title: str, body: str) -> None:
    """Replace (or append) the ``## title`` section of benchmarks/README.md."""
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    README.write_text(text.rstrip() + "\n")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
