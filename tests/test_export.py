"""`gptlit export`: a trained checkpoint as a transformers directory that gives the same logits and tokens."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from helpers import run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from gptlit.config import GPTConfig
from gptlit.generate import generate
from gptlit.model import GPT
from gptlit.runs import load_model

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
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    with pytest.raises(SystemExit) as failed:
        run_cli("export", "--ckpt_path", str(ckpt), "--out_dir", str(out_dir))
    assert failed.value.code == 1
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before


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
