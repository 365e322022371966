"""notebooks/sample.ipynb: stored clean, and runs top to bottom on a freshly trained run."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from helpers import run_cli, write_config
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "sample.ipynb"
PROMPTS = ["Once upon a time", "Lily and Ben went to the park.", "The little dog"]  # the notebook's


def parameters_index(nb: nbformat.NotebookNode) -> int:
    return next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", []))


def cell_with(nb: nbformat.NotebookNode, source: str) -> nbformat.NotebookNode:
    (cell,) = [cell for cell in nb.cells if cell.cell_type == "code" and source in cell.source]
    return cell


def printed(cell: nbformat.NotebookNode) -> str:
    return "".join(out.text for out in cell.outputs if out.output_type == "stream" and out.name == "stdout")


def test_notebook_is_stored_clean() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert set(nb.metadata) <= {"kernelspec", "language_info"}  # no widget state, no user's environment
    assert nb.metadata.kernelspec.name == "python3"
    assert nb.cells[parameters_index(nb)] is code[0]  # papermill's convention: the parameters come first
    assert "CKPT_PATH = None" in code[0].source


@pytest.mark.slow
def test_notebook_runs_on_the_latest_run(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_cli("fit", "--config", str(write_config(workdir, max_steps=4, val_check_interval=4)))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # As papermill injects parameters: a cell right after the tagged one. CKPT_PATH stays None, as users have it.
    injected = nbformat.v4.new_code_cell(f'ROOT_DIR = {str(workdir)!r}\nDEVICE = "cpu"')
    nb.cells.insert(parameters_index(nb) + 1, injected)
    monkeypatch.setenv("MPLBACKEND", "Agg")  # headless, as on CI: the notebook must still show its plot
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()

    best = workdir / "lightning_logs" / "run" / "checkpoints" / "best.ckpt"
    assert printed(cell_with(nb, "load_model(")).startswith(f"{best} on cpu")

    stories = printed(cell_with(nb, "def write(")).strip().split("\n\n")
    assert len(stories) == len(PROMPTS)
    for story, prompt in zip(stories, PROMPTS, strict=True):
        assert story.startswith(prompt) and len(story) > len(prompt) + 10, story

    (table,) = [out.data["text/html"] for out in cell_with(nb, "HTML(").outputs if "text/html" in out.get("data", {})]
    assert table.count("<td") == 3 * 2  # three temperatures, two top-k

    plot = cell_with(nb, "EventAccumulator(")
    assert any("image/png" in out.get("data", {}) for out in plot.outputs)

    speeds = printed(cell_with(nb, "NgramTable.from_data_dir(")).splitlines()
    assert len(speeds) == 13 and speeds[0].startswith("the model's own table: ")
    for greedy_or_sampled in (speeds[1:7], speeds[7:13]):  # each: the settings, four speeds, the check
        assert all("tokens/s" in line for line in greedy_or_sampled[1:5])
        assert greedy_or_sampled[5] == "the same story each way: True"

    story = printed(nb.cells[-1])
    assert story.startswith("Once upon a time") and len(story) > len("Once upon a time") + 10
