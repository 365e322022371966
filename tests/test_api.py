"""gptlit's public face in Python: the seed script's usage, in gptlit's terms, as the README shows it."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import gptlit
from gptlit.generation.generate import generate

README = Path(__file__).parents[1] / "README.md"


def readme_python_example() -> str:
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "load_from_checkpoint" in b]
    return block


def test_the_readme_example_writes_a_story(trained: Path) -> None:
    """The README's snippet, run as it stands against a trained run's checkpoint."""
    code = readme_python_example()
    (path,) = re.findall(r'"(lightning_logs/[^"]+\.ckpt)"', code)
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(trained)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code.replace(path, "lightning_logs/run/checkpoints/best.ckpt"), "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    prompt = re.search(r'prompt = "([^"]+)"', code).group(1)
    assert out.getvalue().startswith(prompt) and len(out.getvalue()) > len(prompt) + 10


def test_generate_takes_a_list_and_gives_back_the_prompt_and_its_continuation(trained: Path) -> None:
    ckpt = trained / "lightning_logs" / "run" / "checkpoints" / "last.ckpt"
    model, tokenizer = gptlit.GPT.load_from_checkpoint(ckpt), gptlit.Tokenizer.from_checkpoint(ckpt)
    assert not model.training
    ids = tokenizer.encode("Lily saw", bos=True)
    out = model.generate(token_ids=ids, max_new_tokens=10, temperature=0)
    assert isinstance(out, list) and out[: len(ids)] == ids and len(out) == len(ids) + 10
    (new,) = generate(model, ids, 10, temperature=0)
    assert out[len(ids) :] == new
    two = model.generate([ids, ids[:2]], max_new_tokens=3, temperature=0)
    assert [len(row) for row in two] == [len(ids) + 3, 5]


def test_importing_gptlit_is_light_and_names_its_parts() -> None:
    code = "import sys, gptlit; print('torch' in sys.modules, 'lightning' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
    for name in gptlit.__all__:
        assert getattr(gptlit, name).__name__ == name


def test_the_readme_sampling_options_example_runs(trained: Path) -> None:
    """The README's SamplingOptions snippet, after its first snippet (which loads the model and the tokenizer)."""
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "SamplingOptions(" in b]
    first = readme_python_example()
    (path,) = re.findall(r'"(lightning_logs/[^"]+\.ckpt)"', first)
    names: dict = {}
    cwd = os.getcwd()
    os.chdir(trained)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(first.replace(path, "lightning_logs/run/checkpoints/best.ckpt"), "README.md", "exec"), names)
        exec(compile(block, "README.md", "exec"), names)
    finally:
        os.chdir(cwd)
    assert 0 < len(names["new_ids"]) <= 200 and names["options"].top_k == 40
