"""`gptlit export`: a trained checkpoint as a transformers directory that gives the same logits and tokens."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from helpers import run_cli
from preloaded import Preloaded
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from gptlit.generation.generate import generate
from gptlit.model.config import GPTConfig
from gptlit.model.gpt import GPT
from gptlit.training.runs import load_model

TESTS = Path(__file__).parent
TEXTS = ["Once upon a time, Lily saw a big dog.", "Tom said “Yes!” and smiled. 🙂", "café\nJosé ran fast"]


@pytest.fixture(scope="module")
def exported(trained: Path) -> tuple[Path, Path]:
    ckpt = trained / "lightning_logs" / "run" / "checkpoints" / "last.ckpt"
    out_dir = trained / "hf"
    run_cli("export", "--ckpt_path", str(ckpt), "--out_dir", str(out_dir))
    return ckpt, out_dir


def test_transformers_gives_the_same_logits_tokens_and_ids(exported: tuple[Path, Path]) -> None:
    ckpt, out_dir = exported
    ours, tokenizer = load_model(ckpt)
    theirs = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(out_dir)
    assert type(theirs).__name__ == "GPTNeoXForCausalLM"

    for text in TEXTS:  # <bos> first, as gptlit reads a prompt; decoded without it
        assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text, bos=True)
        assert hf_tokenizer.decode(tokenizer.encode(text, bos=True), skip_special_tokens=True) == text

    ids = torch.tensor([tokenizer.encode(text, bos=True)[:12] for text in TEXTS])  # (3, 12)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids))

    prompt = torch.tensor([tokenizer.encode("Lily", bos=True)])
    (greedy,) = generate(ours, prompt, 24, temperature=0)  # 26 tokens: within block_size 32
    with torch.no_grad():
        hf_out = theirs.generate(
            prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_id
        )
    assert hf_out[0, prompt.size(1) :].tolist() == greedy
    assert hf_tokenizer.bos_token_id == 1 and hf_tokenizer.eos_token_id == 2 and hf_tokenizer.pad_token_id == 0


def test_the_text_generation_pipeline_writes_what_gptlit_sample_writes(exported: tuple[Path, Path], capsys) -> None:
    """The exported tokenizer reads a prompt as <bos> + text, as gptlit does: the same greedy story."""
    ckpt, out_dir = exported
    generator = pipeline("text-generation", model=str(out_dir), device="cpu")
    for prompt in ("Lily", "Tom said"):
        capsys.readouterr()
        run_cli("sample", "--ckpt_path", str(ckpt), "--prompt", prompt, "--temperature", "0", "--max_new_tokens", "24")
        ours = capsys.readouterr().out
        theirs = generator(prompt, max_new_tokens=24, do_sample=False)[0]["generated_text"]
        assert len(ours) > len(prompt) + 10
        assert theirs + "\n" == ours


def test_the_export_loads_without_gptlit(exported: tuple[Path, Path]) -> None:
    _, out_dir = exported
    code = (
        "import sys; sys.modules['gptlit'] = None\n"  # any import of gptlit would now fail
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out_dir)!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(out_dir)!r})\n"
        "print(m(**t('Once', return_tensors='pt')).logits.shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("torch.Size([1, ") and result.stdout.strip().endswith(", 320])")


def test_an_existing_out_dir_is_left_alone(exported: tuple[Path, Path], capsys) -> None:
    ckpt, out_dir = exported
    before = files(out_dir)
    with pytest.raises(SystemExit) as failed:
        run_cli("export", "--ckpt_path", str(ckpt), "--out_dir", str(out_dir))
    assert failed.value.code == 1
    assert "--overwrite" in capsys.readouterr().err
    assert files(out_dir) == before


@pytest.mark.parametrize(
    "variant",
    [dict(norm_type="rmsnorm"), dict(mlp="swiglu"), dict(n_kv_heads=1)],  # with GELU; with LayerNorm; MQA and LayerNorm
    ids=str,
)
def test_variants_without_an_exact_transformers_architecture_are_refused(
    exported: tuple[Path, Path], tmp_path: Path, capsys, variant: dict
) -> None:
    ckpt, _ = exported
    checkpoint = torch.load(ckpt, weights_only=True)
    config = GPTConfig(**{**checkpoint["gptlit"]["config"], **variant})
    checkpoint["gptlit"]["config"] = config.to_dict()
    checkpoint["state_dict"] = {f"model.{k}": v for k, v in GPT(config).state_dict().items()}
    other = tmp_path / "other.ckpt"
    torch.save(checkpoint, other)
    with pytest.raises(SystemExit) as failed:
        run_cli("export", "--ckpt_path", str(other), "--out_dir", str(tmp_path / "out"))
    assert failed.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no transformers architecture is exactly this model" in line and "(Llama)" in line
    assert not (tmp_path / "out").exists()


# Replacing a previous export, and nothing else ------------------------------------------------------------


def files(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative path: bytes), hidden ones too."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def previous(exported: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export of other weights (the trained ones, moved): what an `--overwrite` export replaces."""
    ckpt, _ = exported
    root = tmp_path_factory.mktemp("previous")
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["state_dict"] = {
        k: v + 0.01 if v.is_floating_point() else v for k, v in checkpoint["state_dict"].items()
    }
    torch.save(checkpoint, root / "other.ckpt")
    run_cli("export", "--ckpt_path", str(root / "other.ckpt"), "--out_dir", str(root / "hf"))
    return root / "hf"


def write_foreign_files(directory: Path, previous: Path) -> None:
    (directory / "project").mkdir(parents=True)
    (directory / "notes.txt").write_text("mine")
    (directory / "project" / "main.py").write_text("print('mine')")
    (directory / "config.json").write_text("{}")  # a name an export writes, beside others


def write_own_readme(directory: Path, previous: Path) -> None:
    shutil.copytree(previous, directory)
    (directory / "README.md").write_text("# My notes on this model\n")


@pytest.mark.parametrize("out_dir", ["mine", "."])
@pytest.mark.parametrize(
    ("write", "named"),
    [(write_foreign_files, "(notes.txt, project/)"), (write_own_readme, "(README.md (not gptlit's model card))")],
    ids=["other-files", "own-readme"],
)
def test_overwrite_refuses_what_is_not_a_previous_export_and_changes_nothing(
    exported, previous, tmp_path, monkeypatch, capsys, out_dir, write, named
) -> None:
    ckpt, _ = exported
    mine = tmp_path / "mine"
    write(mine, previous)
    mine.chmod(0o755)
    before = files(tmp_path)
    monkeypatch.chdir(mine if out_dir == "." else tmp_path)
    with pytest.raises(SystemExit) as failed:
        run_cli("export", "--ckpt_path", str(ckpt), "--out_dir", out_dir, "--overwrite", "true")
    assert failed.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"gptlit: error: --out_dir {out_dir} holds files that are not a gptlit export {named}")
    assert "move them away" in line
    assert files(tmp_path) == before and mode(mine) == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


@pytest.mark.parametrize("card", [True, False], ids=["with-card", "0.1.0-without-card"])
def test_overwrite_replaces_a_previous_export_whole(exported, previous, tmp_path, card) -> None:
    ckpt, new = exported
    out = tmp_path / "hf"
    shutil.copytree(previous, out)
    if not card:
        (out / "README.md").unlink()  # gptlit 0.1.0 wrote no model card
    out.chmod(0o750)
    run_cli("export", "--ckpt_path", str(ckpt), "--out_dir", str(out), "--overwrite", "true")
    assert files(out) == files(new)
    assert mode(out) == 0o750  # the mode the directory had
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
    AutoModelForCausalLM.from_pretrained(out)


def test_an_export_gets_the_modes_the_umask_gives(exported, tmp_path) -> None:
    """Not tempfile.mkdtemp's 0700: exported weights are shared, not secrets."""
    ckpt, _ = exported
    umask = os.umask(0o022)
    try:
        run_cli("export", "--ckpt_path", str(ckpt), "--out_dir", str(tmp_path / "new" / "hf"))
    finally:
        os.umask(umask)
    out = tmp_path / "new" / "hf"
    assert mode(out.parent) == mode(out) == 0o755
    assert {p.name: mode(p) for p in out.iterdir()} == {p.name: 0o644 for p in out.iterdir()}


def test_the_leftovers_of_killed_exports_are_removed_and_nothing_else(exported, previous, tmp_path) -> None:
    ckpt, new = exported
    out = tmp_path / "hf"
    shutil.copytree(previous, out)
    stale = [".hf.gptlit-staging-0123456789abcdef", ".hf.gptlit-previous", ".hf-k2j_x9a1"]  # the last: gptlit 0.2.0's
    for name in stale:
        shutil.copytree(previous, tmp_path / name)
    (tmp_path / stale[0] / "model.safetensors").unlink()  # killed while writing
    kept = {
        ".hf-notes123": "a directory of the user's",  # 0.2.0's pattern, but not only export files in it
        ".other.gptlit-staging-0123456789abcdef": "another export's",
        ".hf.gptlit-staging-fedcba9876543210": "a running export's",  # locked, as a live export's is
    }
    for name, text in kept.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text(text)
    lock = os.open(tmp_path / ".hf.gptlit-staging-fedcba9876543210", os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        run_cli("export", "--ckpt_path", str(ckpt), "--out_dir", str(out), "--overwrite", "true")
    finally:
        os.close(lock)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["hf", *kept])
    assert all((tmp_path / name / "notes.txt").read_text() == text for name, text in kept.items())
    assert files(out) == files(new)


def test_an_export_moved_aside_by_a_killed_overwrite_comes_back(exported, previous, tmp_path, capsys) -> None:
    """Killed between the two renames that replace a one-step exchange: the next export puts the old one back
    before it looks at --out_dir (so it is replaced only with --overwrite)."""
    ckpt, _ = exported
    out = tmp_path / "hf"
    shutil.copytree(previous, tmp_path / ".hf.gptlit-previous")
    with pytest.raises(SystemExit) as failed:
        run_cli("export", "--ckpt_path", str(ckpt), "--out_dir", str(out))
    assert failed.value.code == 1 and "--overwrite" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["hf"] and files(out) == files(previous)


# Real processes stopped mid-export ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def preloaded() -> Preloaded:
    server = Preloaded({**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])})
    yield server
    server.close()


def start_paused(preloaded: Preloaded, args: list[str], tmp_path: Path, event: str, count: int, **options) -> int:
    """Start ``python -m gptlit *args`` and wait until it stops before the ``count``-th ``event`` of its export
    (see tests/preloaded.py), under ``tmp_path / "exports"``."""
    marker, log = tmp_path / "paused", tmp_path / "log"
    pause = dict(event=event, count=count, under=str(tmp_path / "exports"), marker=str(marker))
    pid = preloaded.start(args, tmp_path, log, pause=pause, **options)
    while not marker.exists():
        code = preloaded.poll(pid)
        assert code is None, f"ended ({code}) before its {count}th {event}:\n{log.read_text()[-3000:]}"
        time.sleep(0.01)
    return pid


@pytest.mark.slow
@pytest.mark.parametrize(
    ("event", "count", "no_exchange", "moved_aside"),
    [
        pytest.param("open", 3, False, False, id="writing"),
        pytest.param("os.remove", 2, False, False, id="removing-the-old"),
        pytest.param("open", 3, True, False, id="writing-two-renames"),
        pytest.param("os.rename", 2, True, True, id="between-the-two-renames"),
        pytest.param("os.remove", 2, True, False, id="removing-the-old-two-renames"),
    ],
)
def test_kill_9_mid_overwrite_leaves_the_old_or_the_new_export(
    exported, previous, tmp_path, preloaded, event, count, no_exchange, moved_aside
) -> None:
    """`export --overwrite` over a previous export, SIGKILLed just before a file operation: --out_dir loads as
    the old or the new export (killed between the two renames that stand in for a one-step exchange, the old one
    waits beside it), and the next export puts it right and leaves nothing else behind."""
    ckpt, new = exported
    out = tmp_path / "exports" / "hf"
    shutil.copytree(previous, out)
    args = ["export", "--ckpt_path", str(ckpt), "--out_dir", str(out), "--overwrite", "true"]
    pid = start_paused(preloaded, args, tmp_path, event, count, no_exchange=no_exchange)
    os.kill(pid, signal.SIGKILL)
    assert preloaded.wait(pid) == -signal.SIGKILL
    whole = out.with_name(".hf.gptlit-previous") if moved_aside else out
    assert out.exists() != moved_aside
    assert files(whole) in (files(previous), files(new))
    AutoModelForCausalLM.from_pretrained(whole)
    run_cli(*args)
    assert [p.name for p in out.parent.iterdir()] == ["hf"] and files(out) == files(new)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_export_leaves_the_old_one_and_nothing_else(exported, previous, tmp_path, preloaded, signum):
    ckpt, _ = exported
    out = tmp_path / "exports" / "hf"
    shutil.copytree(previous, out)
    args = ["export", "--ckpt_path", str(ckpt), "--out_dir", str(out), "--overwrite", "true"]
    pid = start_paused(preloaded, args, tmp_path, "open", 3)
    os.kill(pid, signum)
    assert preloaded.wait(pid) == (143 if signum == signal.SIGTERM else 1)  # 1: the KeyboardInterrupt's
    assert [p.name for p in out.parent.iterdir()] == ["hf"] and files(out) == files(previous)
