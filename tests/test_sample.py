"""`gptlit sample`: stories from a trained checkpoint, reproducible, streamed, and safe to load."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
from helpers import run_cli

from gptlit.data.tokenizer import Tokenizer
from gptlit.training.runs import load_model


@pytest.fixture
def in_trained(trained: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(trained)
    return trained


def sample_out(capsys, *args: str) -> tuple[str, str]:
    capsys.readouterr()
    run_cli("sample", *args)
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_sample_writes_a_story_and_reports_speed(in_trained: Path, capsys) -> None:
    out, err = sample_out(capsys, "--ckpt_path", "last", "--prompt", "Lily", "--max_new_tokens", "30", "--seed", "0")
    assert out.startswith("Lily") and len(out.strip()) > len("Lily")
    assert "tokens/s" in err
    reported = int(err.split("[")[1].split(" tokens")[0])
    assert 1 <= reported <= 30


def test_same_seed_same_story_other_seed_other_story(in_trained: Path, capsys) -> None:
    args = ("--ckpt_path", "best", "--max_new_tokens", "40", "--temperature", "1.0", "--top_k", "null")
    first, _ = sample_out(capsys, *args, "--seed", "3")
    again, _ = sample_out(capsys, *args, "--seed", "3")
    other, _ = sample_out(capsys, *args, "--seed", "4")
    assert first == again
    assert first != other


def test_num_samples_writes_each_sample(in_trained: Path, capsys) -> None:
    out, _ = sample_out(capsys, "--num_samples", "3", "--max_new_tokens", "10", "--seed", "1")
    assert out.count("--- sample") == 3


def test_streamed_text_equals_the_decoded_story(in_trained: Path) -> None:
    from gptlit.cli.sample import write_story
    from gptlit.generation.generate import SamplingOptions, generate

    model, tokenizer = load_model(in_trained / "lightning_logs" / "run" / "checkpoints" / "last.ckpt")
    out = io.StringIO()
    write_story(model, tokenizer, "Tom", SamplingOptions(50, 1.0, seed=5), out=out)
    (ids,) = generate(model, tokenizer.encode("Tom", bos=True), 50, temperature=1.0, eos_id=tokenizer.eos_id, seed=5)
    assert out.getvalue() == "Tom" + tokenizer.decode(ids) + "\n"
    assert tokenizer.eos_id not in ids and len(ids) <= 50


def test_streaming_decodes_each_token_once(in_trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding all ids again for every new token would make a story's streaming quadratic in its length."""
    from gptlit.cli.sample import write_story
    from gptlit.generation.generate import SamplingOptions

    model, tokenizer = load_model(in_trained / "lightning_logs" / "run" / "checkpoints" / "last.ckpt")
    decoded: list[list[int]] = []
    decode = tokenizer.decode

    def counting_decode(ids, **kwargs) -> str:
        decoded.append(list(ids))
        return decode(ids, **kwargs)

    monkeypatch.setattr(tokenizer, "decode", counting_decode)
    out = io.StringIO()
    new = write_story(model, tokenizer, "Tom", SamplingOptions(40, 1.0, seed=5), out=out)
    assert new > 10 and len(decoded) == 1  # once, for what the stream may still hold back at the very end


def test_prompt_longer_than_block_size_and_empty_prompt_work(in_trained: Path, capsys) -> None:
    long_prompt = "Lily saw the big red ball in the park and ran to it. " * 10  # > 32 tokens of block_size
    out, _ = sample_out(capsys, "--prompt", long_prompt, "--max_new_tokens", "40", "--seed", "0")
    assert out.startswith(long_prompt) and len(out) > len(long_prompt)
    out, _ = sample_out(capsys, "--prompt", "", "--max_new_tokens", "20", "--seed", "0")
    assert out.strip()


def test_interactive_loop_ends_on_quit_and_on_end_of_input(
    in_trained: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Mia\nquit\nnever read\n"))
    out, _ = sample_out(capsys, "--interactive", "true", "--max_new_tokens", "5", "--seed", "0")
    assert "Mia" in out and "never read" not in out
    monkeypatch.setattr("sys.stdin", io.StringIO("Ben\n"))  # then end of input
    out, _ = sample_out(capsys, "--interactive", "true", "--max_new_tokens", "5", "--seed", "0")
    assert "Ben" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--ckpt_path", "missing.ckpt"), "checkpoint not found"),
        (("--temperature", "-1"), "temperature must be a finite number >= 0 (0 is greedy), got -1.0"),
        (("--temperature", "nan"), "temperature must be a finite number >= 0 (0 is greedy), got nan"),
        (("--temperature", "inf"), "temperature must be a finite number >= 0 (0 is greedy), got inf"),
        (("--temperature", ".nan"), "temperature must be a finite number >= 0 (0 is greedy), got nan"),
        (("--top_p", "1.5"), "top_p must be a number in (0, 1], or null (no top-p), got 1.5"),
        (("--top_p", "0"), "top_p must be a number in (0, 1]"),
        (("--top_p", "nan"), "top_p must be a number in (0, 1]"),
        (("--top_k", "0"), "top_k must be an integer >= 1, or null (no top-k), got 0"),
        (("--top_k", "1.5"), "top_k must be an integer >= 1"),
        (("--max_new_tokens", "-1"), "max_new_tokens must be an integer >= 0, got -1"),
        (("--max_new_tokens", "inf"), "max_new_tokens must be an integer >= 0, got inf"),
        (("--num_samples", "0"), "num_samples must be an integer >= 1, got 0"),
        (("--seed", str(2**64)), "seed must be a 64-bit integer"),
        (("--prompt", "Lily \udcff"), "the prompt is not valid UTF-8 text (at character 6)"),
        (("--interactive", "true", "--temperature", "-1"), "temperature must be"),
    ],
)
def test_bad_arguments_are_one_line_errors_before_any_output(
    in_trained: Path, capsys, monkeypatch: pytest.MonkeyPatch, args, message: str
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Mia\n"))
    with pytest.raises(SystemExit) as failed:
        run_cli("sample", *args)
    assert failed.value.code == 1
    captured = capsys.readouterr()
    assert captured.out == "" and sys.stdin.read() == "Mia\n"  # nothing written, no prompt read
    (line,) = captured.err.strip().splitlines()  # one line
    assert line.startswith("gptlit: error: ") and message in line


def test_a_bad_interactive_line_is_reported_and_the_session_goes_on(
    in_trained: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Tom \udcff\nMia\n"))
    out, err = sample_out(capsys, "--interactive", "true", "--max_new_tokens", "5", "--seed", "0")
    assert "gptlit: error: the prompt is not valid UTF-8 text (at character 5)" in err
    assert "Tom" not in out and "Mia" in out


def test_draft_data_gives_the_same_greedy_story(in_trained: Path, capsys) -> None:
    args = ("--ckpt_path", "last", "--prompt", "Tom", "--max_new_tokens", "40", "--temperature", "0")
    plain, _ = sample_out(capsys, *args)
    drafted, _ = sample_out(capsys, *args, "--draft_data", "data")
    assert drafted == plain and len(plain) > len("Tom\n")


@pytest.mark.slow
def test_compiled_sampling_writes_the_same_story(in_trained: Path, capsys) -> None:
    args = ("--ckpt_path", "last", "--prompt", "Tom", "--max_new_tokens", "30", "--temperature", "0")
    plain, _ = sample_out(capsys, *args)
    compiled, err = sample_out(capsys, *args, "--compile", "true", "--draft_data", "data")
    assert compiled == plain and "compiled in" in err


def test_draft_data_gives_the_same_sampled_story(in_trained: Path, capsys) -> None:
    args = ("--ckpt_path", "last", "--max_new_tokens", "40", "--temperature", "0.8", "--top_k", "40", "--seed", "1")
    plain, _ = sample_out(capsys, *args, "--num_samples", "2")
    drafted, _ = sample_out(capsys, *args, "--num_samples", "2", "--draft_data", "data")
    one_by_one, _ = sample_out(capsys, *args, "--num_samples", "2", "--draft_tokens", "0")
    assert drafted == plain == one_by_one and plain.count("--- sample") == 2


def test_draft_data_of_another_tokenizer_is_a_clear_error(in_trained: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other"
    shutil.copytree(in_trained / "data", other)
    meta = json.loads((other / "meta.json").read_text())
    meta["settings"]["tokenizer_sha256"] = "0" * 64
    (other / "meta.json").write_text(json.dumps(meta))
    for data, message in ((other, "another tokenizer"), (tmp_path / "missing", "not found")):
        with pytest.raises(SystemExit) as failed:
            run_cli("sample", "--temperature", "0", "--draft_data", str(data))
        assert failed.value.code == 1
        assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_ckpt_path_last_without_any_run_is_a_clear_error(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as failed:
        run_cli("sample", "--ckpt_path", "last")
    assert failed.value.code == 1
    assert "no run found" in capsys.readouterr().err


def test_checkpoint_carries_config_and_tokenizer(in_trained: Path) -> None:
    path = in_trained / "lightning_logs" / "run" / "checkpoints" / "last.ckpt"
    model, tokenizer = load_model(path)
    prepared = Tokenizer.from_file(in_trained / "data" / "tokenizer.json")
    assert tokenizer.sha256 == prepared.sha256
    assert model.config.embed_dim == 32 and not model.training


SAMPLED = ("--ckpt_path", "last", "--max_new_tokens", "40", "--temperature", "0.8", "--top_k", "40", "--seed", "2")


def test_sample_drafts_from_its_runs_data_by_default(in_trained: Path, capsys) -> None:
    auto, err = sample_out(capsys, *SAMPLED)
    assert err.strip().endswith(f", n-grams of {in_trained / 'data'}]")  # the run's data.data_dir
    alone, err = sample_out(capsys, *SAMPLED, "--draft_data", "none")
    assert alone == auto and "n-grams" not in err


def test_without_its_runs_data_sample_drafts_from_the_story_alone(trained: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    story, _ = sample_out(capsys, *SAMPLED)
    moved = tmp_path / "moved"
    shutil.copytree(trained, moved, ignore=shutil.ignore_patterns("data"))
    config = moved / "lightning_logs" / "run" / "config.yaml"
    config.write_text(config.read_text().replace(str(trained / "data"), "data"))  # relative: looked for in moved/
    monkeypatch.chdir(moved)
    gone, err = sample_out(capsys, *SAMPLED)
    assert gone == story and "n-grams" not in err
    shutil.copytree(trained / "data", moved / "data")
    there, err = sample_out(capsys, *SAMPLED)
    assert there == story and err.strip().endswith(", n-grams of data]")
    meta = json.loads((moved / "data" / "meta.json").read_text())
    meta["settings"]["tokenizer_sha256"] = "0" * 64  # now another tokenizer's tokens
    (moved / "data" / "meta.json").write_text(json.dumps(meta))
    other, err = sample_out(capsys, *SAMPLED)
    assert other == story and "n-grams" not in err
