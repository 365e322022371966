"""``trainer.precision: auto`` (gptlit.cli.precision): the precision that fits the machine, resolved at the start."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import write_config

from gptlit.cli.main import make_cli
from gptlit.cli.precision import BF16_CPU_FLAGS, auto_precision, cpu_flags


def test_auto_on_this_cpu_follows_its_flags() -> None:
    """On a CPU without bfloat16 units (this machine's AMD EPYC: AVX2 only) auto is float32."""
    flags = cpu_flags()
    assert flags is not None and "fpu" in flags  # /proc/cpuinfo was read
    expected = "bf16-mixed" if flags & set(BF16_CPU_FLAGS) else "32-true"
    assert auto_precision("cpu")[0] == expected


@pytest.mark.parametrize(
    ("flags", "expected"),
    [({"avx2", "amx_bf16", "amx_tile"}, "bf16-mixed"), ({"avx512f", "avx512_bf16"}, "bf16-mixed"),
     ({"avx2", "fma"}, "32-true"), ({"avx512f", "avx512bw"}, "32-true")],
)  # fmt: skip
def test_auto_on_a_cpu_takes_bfloat16_only_with_bfloat16_units(flags: set[str], expected: str) -> None:
    precision, why = auto_precision("cpu", flags=flags)
    assert precision == expected
    assert why.startswith("the CPU has bfloat16 units") == (expected == "bf16-mixed")


@pytest.mark.parametrize("faster", [True, False])
def test_auto_on_a_cpu_of_unknown_flags_measures(monkeypatch: pytest.MonkeyPatch, faster: bool) -> None:
    monkeypatch.setattr("gptlit.cli.precision.bf16_matmul_is_faster", lambda: faster)
    precision, why = auto_precision("cpu", flags=None)
    assert precision == ("bf16-mixed" if faster else "32-true") and "matrix product" in why


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16-mixed"), (False, "16-mixed")])
def test_auto_on_cuda_takes_bfloat16_where_the_gpu_has_it(monkeypatch, bf16: bool, expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    assert auto_precision("auto", flags={"avx2"})[0] == expected
    assert auto_precision("cpu", flags={"avx2"})[0] == "32-true"  # a CPU run on a machine with a GPU


def test_cpu_flags_reads_the_flags_line(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(tmp_path / "missing") is None


def test_fit_resolves_auto_before_the_trainer_starts_and_says_why(workdir: Path, capsys) -> None:
    config = write_config(workdir)
    cli = make_cli(["--config", str(config), "--trainer.precision", "auto"], run=False)  # as fit builds it
    expected = auto_precision("cpu")[0]
    assert cli.trainer.precision == expected
    assert f"gptlit: trainer.precision auto: {expected}, since " in capsys.readouterr().err
