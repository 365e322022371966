"""Runs written by gptlit 0.1.0 and 0.2.0 (tests/fixtures/) still sample, export, validate and resume; 0.2.0's
module and class paths still import."""

from __future__ import annotations

import importlib
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_cli, scalars, write_config, write_corpus

from gptlit.data.tokenizer import Tokenizer
from gptlit.moved import MOVED
from gptlit.training.module import GPTLitModule
from gptlit.training.runs import load_model

FIXTURES = Path(__file__).parent / "fixtures"


def copy_run(name: str, where: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the fixture run ``name`` in ``where``/lightning_logs, beside the corpus its config names
    (stories.txt), with ``where`` the working directory."""
    write_corpus(where / "stories.txt")
    shutil.copytree(FIXTURES / name, where / "lightning_logs" / name)
    monkeypatch.chdir(where)
    return where / "lightning_logs" / name


@pytest.fixture
def old_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The 0.1.0 run."""
    return copy_run("run-0.1.0", tmp_path, monkeypatch)


def test_an_old_checkpoint_samples_and_exports(old_run: Path, capsys) -> None:
    capsys.readouterr()
    run_cli("sample", "--prompt", "Lily", "--max_new_tokens", "12", "--seed", "0")
    assert capsys.readouterr().out.startswith("Lily")
    run_cli("export", "--ckpt_path", "last", "--out_dir", "hf")
    assert (old_run.parents[1] / "hf" / "model.safetensors").is_file()
    model, tokenizer = load_model(old_run / "checkpoints" / "last.ckpt")
    assert model.config.embed_dim == 16 and tokenizer.vocab_size == 320


def test_an_old_run_validates_and_resumes_from_its_own_config(old_run: Path, capsys) -> None:
    last = old_run / "checkpoints" / "last.ckpt"
    before = torch.load(last, weights_only=True)
    assert before["global_step"] == 6
    run_cli("validate", "--ckpt_path", "last")
    # The corpus of today's test helpers trains the very tokenizer the old checkpoint carries.
    assert Tokenizer.from_file(old_run.parents[1] / "data" / "tokenizer.json").sha256 == (
        Tokenizer.from_str(before["gptlit"]["tokenizer"]).sha256
    )
    run_cli("fit", "--ckpt_path", "last", "--trainer.max_steps", "9")
    assert {"train/lr/decay", "train/lr/no_decay"} <= set(scalars(old_run))  # 0.1.0's groups, named as now
    after = torch.load(last, weights_only=True)
    assert after["global_step"] == 9
    assert sorted(p.name for p in last.parent.glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]
    moved = [name for name, t in after["state_dict"].items() if not torch.equal(t, before["state_dict"][name])]
    assert moved, "resuming trained nothing"


def test_an_old_checkpoint_loads_as_a_lightning_module(old_run: Path) -> None:
    module = GPTLitModule.load_from_checkpoint(old_run / "checkpoints" / "last.ckpt")
    assert module.config.embed_dim == 16 and module.config.mlp == "gelu" and module.config.tie_embeddings
    assert module.hparams.learning_rate == 0.003 and module.tokenizer is not None
    model, _ = load_model(old_run / "checkpoints" / "last.ckpt")
    for name, tensor in model.state_dict().items():
        assert torch.equal(module.model.state_dict()[name], tensor), name


def test_a_checkpoint_of_a_newer_format_is_refused(old_run: Path, capsys) -> None:
    checkpoint = torch.load(old_run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["gptlit"]["format"] = 99
    torch.save(checkpoint, old_run / "checkpoints" / "future.ckpt")
    with pytest.raises(SystemExit) as failed:
        run_cli("sample", "--ckpt_path", str(old_run / "checkpoints" / "future.ckpt"))
    assert failed.value.code == 1
    assert "checkpoint format 99, newer than this gptlit reads" in capsys.readouterr().err


def test_old_command_line_options_are_read_where_they_moved(old_run: Path, capsys) -> None:
    """gptlit 0.1.0 spelled the model's shape --model.<field>; it is --model.config.<field> now."""
    with pytest.raises(SystemExit) as failed:
        run_cli("validate", "--ckpt_path", "last", "--model.embed_dim", "32")
    # Not an unknown option (exit 2): read as model.config.embed_dim, and checked against the checkpoint's.
    assert failed.value.code == 1
    assert "holds a model with embed_dim=16" in capsys.readouterr().err


@pytest.fixture
def run_020(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The 0.2.0 run (Muon, WSD, a Llama-shaped model)."""
    return copy_run("run-0.2.0", tmp_path, monkeypatch)


def test_a_020_run_samples_exports_and_validates(run_020: Path, capsys) -> None:
    capsys.readouterr()
    run_cli("sample", "--prompt", "Lily", "--max_new_tokens", "12", "--seed", "0", "--run_name", "run-0.2.0")
    assert capsys.readouterr().out.startswith("Lily")
    run_cli("export", "--ckpt_path", "best", "--run_name", "run-0.2.0", "--out_dir", "hf")
    config = (run_020.parents[1] / "hf" / "config.json").read_text()
    assert "LlamaForCausalLM" in config
    run_cli("validate", "--ckpt_path", "last", "--run_name", "run-0.2.0")
    model, tokenizer = load_model(run_020 / "checkpoints" / "last.ckpt")
    assert (model.config.mlp, model.config.n_kv_heads, model.config.tie_embeddings) == ("swiglu", 1, False)
    assert tokenizer.vocab_size == 320


def test_a_020_run_resumes_where_it_stopped(run_020: Path) -> None:
    """A Muon run of 0.2.0 resumes (its optimizer state fits) and trains on."""
    last = run_020 / "checkpoints" / "last.ckpt"
    before = torch.load(last, weights_only=True)
    assert before["global_step"] == 8
    run_cli("fit", "--ckpt_path", "last", "--run_name", "run-0.2.0", "--trainer.max_steps", "8")
    assert torch.load(last, weights_only=True)["global_step"] == 8
    module = GPTLitModule.load_from_checkpoint(last)
    assert module.hparams.optimizer == "muon" and module.hparams.schedule == "wsd"


def test_module_paths_of_020_import_their_new_modules() -> None:
    """A user's code that names a module of gptlit 0.2.0 gets the module that holds it now, with a warning."""
    for old, new in MOVED.items():
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=f"{old} is {new}"):
            module = importlib.import_module(old)
        assert module is importlib.import_module(new)


def test_class_paths_of_020_in_a_config_are_read_at_their_new_place(workdir: Path) -> None:
    """configs/*.yaml and saved config.yaml files of 0.2.0 name gptlit.callbacks.TextSamples: read as
    gptlit.training.TextSamples, without a warning, and the run's config.yaml says the new path."""
    config = write_config(workdir, name="old", max_steps=2)
    data = yaml.safe_load(config.read_text())
    data["trainer"]["callbacks"] = [{"class_path": "gptlit.callbacks.TextSamples", "init_args": {"max_new_tokens": 4}}]
    config.write_text(yaml.safe_dump(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="(?!gptlit)")
        run_cli("fit", "--config", str(config))
    saved = yaml.safe_load((workdir / "lightning_logs" / "old" / "config.yaml").read_text())
    assert [c["class_path"] for c in saved["trainer"]["callbacks"]] == ["gptlit.training.TextSamples"]
