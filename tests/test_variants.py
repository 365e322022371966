"""Each model variant end to end: trained, stopped and resumed exactly, sampled, exported to the transformers
architecture that is exactly it, and read back there: the same logits, the same greedy story."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import yaml
from helpers import params, run_cli, write_config
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from gptlit.generation.generate import generate
from gptlit.training.runs import load_model

pytestmark = pytest.mark.slow

# name: (model.config settings, the architecture it exports to)
VARIANTS = {
    "gpt2": (dict(use_rope=False), "GPT2LMHeadModel"),
    "neox-relu2-untied": (dict(mlp="relu2", tie_embeddings=False, bias=False), "GPTNeoXForCausalLM"),
    "llama-gqa": (dict(norm_type="rmsnorm", mlp="swiglu", n_kv_heads=1, bias=False), "LlamaForCausalLM"),
    "qwen3": (
        dict(norm_type="rmsnorm", mlp="swiglu", qk_norm=True, bias=False, tie_embeddings=False),
        "Qwen3ForCausalLM",
    ),
}
STOP = '{"class_path": "probes.InterruptAt", "init_args": {"step": 4}}'


def variant_config(root: Path, name: str, variant: dict) -> Path:
    path = write_config(root, name=name, max_steps=8, val_check_interval=4)
    config = yaml.safe_load(path.read_text())
    config["model"]["config"].update(variant, dropout=0.1)  # dropout on: the resumed masks must be the same too
    path.write_text(yaml.safe_dump(config))
    return path


def train_resume_and_sample(workdir: Path, name: str, variant: dict, capsys) -> tuple[Path, str]:
    """Train ``variant`` 8 steps straight, and again stopped by Ctrl-C at step 4 and resumed: the same weights.
    The resumed run's last checkpoint, and its greedy story of "Lily"."""
    config = variant_config(workdir, name, variant)
    run_cli("fit", "--config", str(config), "--run_name", "straight")
    with pytest.raises(SystemExit):  # Ctrl-C after step 4, then resumed to step 8
        run_cli("fit", "--config", str(config), f"--trainer.callbacks+={STOP}")
    run_cli("fit", "--ckpt_path", "last")
    runs = workdir / "lightning_logs"
    straight, resumed = (params(runs / run / "checkpoints" / "last.ckpt") for run in ("straight", name))
    for key, tensor in straight.items():
        torch.testing.assert_close(resumed[key], tensor, rtol=0, atol=1e-6, msg=key)

    ckpt = runs / name / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    run_cli("sample", "--ckpt_path", str(ckpt), "--prompt", "Lily", "--temperature", "0", "--max_new_tokens", "24")
    story = capsys.readouterr().out
    assert story.startswith("Lily") and len(story) > len("Lily") + 10
    return ckpt, story


@pytest.mark.parametrize("name", VARIANTS)
def test_a_variant_trains_resumes_samples_and_exports(name: str, workdir: Path, capsys) -> None:
    variant, architecture = VARIANTS[name]
    ckpt, story = train_resume_and_sample(workdir, name, variant, capsys)

    out_dir = workdir / "hf"
    run_cli("export", "--ckpt_path", str(ckpt), "--out_dir", str(out_dir))
    assert json.loads((out_dir / "config.json").read_text())["architectures"] == [architecture]
    card = (out_dir / "README.md").read_text()
    assert architecture in card and "trained for 8 optimizer steps" in card and "Last validation: val/" in card

    ours, tokenizer = load_model(ckpt)
    theirs = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    assert type(theirs).__name__ == architecture
    ids = torch.tensor([tokenizer.encode("Once upon a time, Lily saw a dog.", bos=True)[:16]] * 2)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)
    (greedy,) = generate(ours, ids[:1], 16, temperature=0)
    hf_greedy = theirs.generate(ids[:1], max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert hf_greedy[0, 16:].tolist() == greedy
    assert AutoTokenizer.from_pretrained(out_dir)("Lily")["input_ids"] == tokenizer.encode("Lily", bos=True)
    text = pipeline("text-generation", model=str(out_dir), device="cpu")("Lily", max_new_tokens=24, do_sample=False)
    assert text[0]["generated_text"] + "\n" == story


def test_geglu_trains_resumes_samples_and_its_export_is_refused_in_one_line(workdir: Path, capsys) -> None:
    ckpt, _ = train_resume_and_sample(workdir, "geglu", dict(mlp="geglu", norm_type="rmsnorm", bias=False), capsys)
    assert type(load_model(ckpt)[0].blocks[0].mlp).__name__ == "GeGLU"
    with pytest.raises(SystemExit) as failed:
        run_cli("export", "--ckpt_path", str(ckpt), "--out_dir", str(workdir / "hf"))
    assert failed.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gptlit: error: no transformers architecture is exactly this model") and len(err) == 1
    assert "mlp geglu: Gemma's GELU-gated MLP is the tanh approximation of GELU" in err[-1]
    assert not (workdir / "hf").exists()
