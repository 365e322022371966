"""What gptlit's own code never does with a file it reads: evaluate it, or unpickle it beyond plain tensors.

The behaviour on real files (a checkpoint whose pickle would run code, given to sample, export and fit) is in
test_bad_inputs.py; this reads the source so that a new loader cannot slip past those rows.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCES = sorted((Path(__file__).parents[1] / "gptlit").glob("*.py"))


def calls(path: Path) -> list[ast.Call]:
    return [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)]


def name(call: ast.Call) -> str:
    """``torch.load`` for ``torch.load(...)``, ``eval`` for ``eval(...)``."""
    return ast.unparse(call.func)


@pytest.mark.parametrize("path", SOURCES, ids=[p.name for p in SOURCES])
def test_no_eval_exec_or_unsafe_loading(path: Path) -> None:
    for call in calls(path):
        called = name(call)
        assert called not in ("eval", "exec", "compile", "pickle.load", "pickle.loads", "yaml.load"), called
        if called == "torch.load":
            weights_only = {k.arg: k.value for k in call.keywords}.get("weights_only")
            assert isinstance(weights_only, ast.Constant) and weights_only.value is True, ast.unparse(call)
