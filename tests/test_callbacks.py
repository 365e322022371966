"""TextSamples: stories in TensorBoard at each validation, reproducible, and invisible to training."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import MODEL, params, run_cli, write_config
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptlit.data.tokenizer import train_tokenizer
from gptlit.errors import ConfigError
from gptlit.generation.generate import generate
from gptlit.model.config import GPTConfig
from gptlit.training import TextSamples, sample_markdown
from gptlit.training.module import GPTLitModule
from gptlit.training.runs import load_model

PROMPTS = ["Lily saw", "Tom said"]  # words of the test corpus (tests/conftest.py)
SAMPLE_ARGS = {"prompts": PROMPTS, "max_new_tokens": 12, "temperature": 0.8, "top_k": 40, "seed": 3}


def text_samples(**init_args) -> str:
    """A ``--trainer.callbacks+=`` value adding TextSamples."""
    return "--trainer.callbacks+=" + json.dumps({"class_path": "gptlit.training.TextSamples", "init_args": init_args})


def logged_texts(run: Path) -> dict[str, list[tuple[int, str]]]:
    """{tag: [(step, text), ...]} of the text summaries in a run's event files."""
    events = EventAccumulator(str(run), size_guidance={"tensors": 0})
    events.Reload()
    return {
        tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(tag)]
        for tag in events.Tags()["tensors"]
        if tag.startswith("samples/")
    }


def test_sample_markdown_keeps_line_breaks_and_shows_text_literally() -> None:
    text = sample_markdown("Once *upon*", " a time.\nThe end_")
    assert text == "**Once \\*upon\\*** a time.  \nThe end\\_"


def test_samples_are_logged_at_each_validation_and_leave_training_unchanged(workdir: Path) -> None:
    # Dropout draws from the global RNG at every step: were sampling to draw from it too, the run with
    # samples would end with other weights than the run without.
    config = write_config(workdir, max_steps=8, val_check_interval=4)  # validations at steps 4 and 8
    run_cli("fit", "--config", str(config), "--run_name", "plain", "--model.config.dropout", "0.1")
    run_cli(
        "fit",
        "--config",
        str(config),
        "--run_name",
        "sampled",
        "--model.config.dropout",
        "0.1",
        text_samples(**SAMPLE_ARGS),
    )

    runs = workdir / "lightning_logs"
    plain = params(runs / "plain" / "checkpoints" / "last.ckpt")
    sampled = params(runs / "sampled" / "checkpoints" / "last.ckpt")
    for name, tensor in plain.items():
        torch.testing.assert_close(sampled[name], tensor, rtol=0, atol=0, msg=name)
    assert logged_texts(runs / "plain") == {}

    texts = logged_texts(runs / "sampled")
    assert sorted(texts) == ["samples/0/text_summary", "samples/1/text_summary"]
    # The weights of the last validation, sampled again outside training: the same seed writes the same story.
    model, tokenizer = load_model(runs / "sampled" / "checkpoints" / "last.ckpt")
    for i, prompt in enumerate(PROMPTS):
        logged = texts[f"samples/{i}/text_summary"]
        assert [step for step, _ in logged] == [4, 8]
        assert all(text.startswith(f"**{prompt}**") for _, text in logged)
        (new_ids,) = generate(
            model,
            tokenizer.encode(prompt, bos=True),
            SAMPLE_ARGS["max_new_tokens"],
            SAMPLE_ARGS["temperature"],
            SAMPLE_ARGS["top_k"],
            eos_id=tokenizer.eos_id,
            seed=SAMPLE_ARGS["seed"],
        )
        assert new_ids, "the model wrote nothing"
        assert logged[-1][1] == sample_markdown(prompt, tokenizer.decode(new_ids))


def test_every_n_validations_and_resume(workdir: Path) -> None:
    config = write_config(workdir, max_steps=4, val_check_interval=2)  # validations at steps 2 and 4
    args = {"prompts": ["Mia"], "max_new_tokens": 4, "every_n_validations": 2}
    run_cli("fit", "--config", str(config), text_samples(**args))
    # The resumed run takes the callback from the run's saved config; it counts validations afresh: 6, not 8.
    run_cli("fit", "--ckpt_path", "last", "--trainer.max_steps", "8")
    texts = logged_texts(workdir / "lightning_logs" / "run")
    assert [step for step, _ in texts["samples/0/text_summary"]] == [2, 6]


def test_nothing_is_sampled_without_a_tokenizer_or_a_tensorboard_logger(tmp_path: Path, stories: list[str]) -> None:
    def trainer(logger) -> L.Trainer:
        return L.Trainer(accelerator="cpu", logger=logger, enable_checkpointing=False, enable_model_summary=False)

    callback = TextSamples(prompts=["Lily"], max_new_tokens=2)
    module = GPTLitModule(GPTConfig(vocab_size=320, **MODEL))
    with_tensorboard = trainer(TensorBoardLogger(tmp_path, name="tb"))
    callback.on_validation_end(with_tensorboard, module)  # no tokenizer yet
    assert not list((tmp_path / "tb").rglob("events.*"))

    module.tokenizer = train_tokenizer(stories, vocab_size=320)
    callback.on_validation_end(trainer(CSVLogger(tmp_path, name="csv")), module)  # a CSV file holds no text
    callback.on_validation_end(with_tensorboard, module)
    with_tensorboard.logger.experiment.flush()
    assert list(logged_texts(next((tmp_path / "tb").iterdir()))) == ["samples/0/text_summary"]


def test_callback_refuses_a_zero_interval() -> None:
    with pytest.raises(ValueError, match="every_n_validations"):
        TextSamples(every_n_validations=0)


@pytest.mark.parametrize(
    ("init_args", "message"),
    [
        (dict(temperature=-1.0), "TextSamples: temperature must be a finite number >= 0 (0 is greedy), got -1.0"),
        (dict(top_k=0), "TextSamples: top_k must be an integer >= 1, or null (no top-k), got 0"),
        (dict(max_new_tokens=-2), "TextSamples: max_new_tokens must be an integer >= 0, got -2"),
    ],
)
def test_callback_refuses_a_bad_sampling_option_when_made(init_args, message) -> None:
    """A bad value stops the run at config time, not at its first validation."""
    with pytest.raises(ConfigError) as raised:
        TextSamples(**init_args)
    assert str(raised.value) == message
