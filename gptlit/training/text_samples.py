"""TextSamples: a few stories in TensorBoard's Text tab after each validation, to read how the model sounds."""

from __future__ import annotations

import re
from collections.abc import Sequence

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from gptlit.checkpoint import model_state_dict
from gptlit.errors import ConfigError, UsageError
from gptlit.generation.generate import SamplingOptions, generate
from gptlit.model.gpt import GPT

DEFAULT_PROMPTS = ("Once upon a time", "Lily and Ben went to the park.", "The little dog")

# Characters that TensorBoard's markdown would read as formatting (it escapes HTML itself).
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]>#])")


def _escape_markdown(text: str) -> str:
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def sample_markdown(prompt: str, continuation: str) -> str:
    """A sample as TensorBoard markdown: the prompt in bold, then the model's text, line breaks kept."""
    text = f"**{_escape_markdown(prompt)}**{_escape_markdown(continuation)}"
    return text.replace("\n", "  \n")  # two trailing spaces: a hard line break in markdown


class TextSamples(L.Callback):
    """Writes a few stories to TensorBoard (the Text tab) after validation, to read how the model sounds.

    Each prompt is continued with the same seed every time, so samples of one run differ only because the
    weights changed. Sampling uses a private random generator: training goes on exactly as without this
    callback. The first process samples and writes, into a ``TensorBoardLogger`` only; under FSDP every
    process first takes part in gathering the full weights, which the first one samples from.

    Args:
        prompts: Beginnings of the stories; sample ``i`` is logged as ``samples/i``.
        max_new_tokens: Tokens to write per story, fewer if the model ends it (``<eos>``).
        temperature: Softmax temperature; 0 is greedy.
        top_k: Sample among the k most likely tokens only (None: all).
        seed: Seed of the sampling generator.
        every_n_validations: Sample at the first validation and every n-th after it (counted from the
            start of this process, so a resumed run samples at its first validation again).
    """

    def __init__(
        self,
        prompts: Sequence[str] = DEFAULT_PROMPTS,
        max_new_tokens: int = 100,
        temperature: float = 0.8,
        top_k: int | None = 40,
        seed: int = 0,
        every_n_validations: int = 1,
    ) -> None:
        if every_n_validations < 1:
            raise ConfigError(f"TextSamples: every_n_validations must be >= 1, got {every_n_validations}")
        self.prompts = list(prompts)
        try:  # checked here, so that a bad value stops the run before it starts
            self.options = SamplingOptions(max_new_tokens, temperature, top_k, seed=seed)
        except UsageError as err:
            raise ConfigError(f"TextSamples: {err}") from None
        self.every_n_validations = every_n_validations
        self._validations = 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        due = self._validations % self.every_n_validations == 0
        self._validations += 1
        tokenizer = getattr(pl_module, "tokenizer", None)
        # The same on every rank: a decision that only some ranks took would leave the others waiting.
        if not (due and tokenizer is not None and any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers)):
            return
        model = sampling_model(trainer, pl_module)
        if model is None:  # not the first process
            return
        loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        for i, prompt in enumerate(self.prompts):
            # generate restores the model's train/eval mode and, with a seed, leaves the global RNG alone.
            ids = tokenizer.encode(prompt, bos=True)
            (new_ids,) = generate(model, ids, eos_id=tokenizer.eos_id, options=self.options)
            text = sample_markdown(prompt, tokenizer.decode(new_ids))
            for logger in loggers:
                logger.experiment.add_text(f"samples/{i}", text, global_step=trainer.global_step)


def sampling_model(trainer: L.Trainer, pl_module: L.LightningModule) -> nn.Module | None:
    """The model to sample from on the first process (None on the others).

    Under FSDP each process holds a shard of the weights and a forward pass needs all of them: every process
    gathers the full weights (``lightning_module_state_dict``, a collective), and the first one samples from
    a plain copy, so that no process waits on another in the middle of sampling.
    """
    if not isinstance(trainer.strategy, FSDPStrategy):
        return pl_module.model if trainer.is_global_zero else None
    state = trainer.strategy.lightning_module_state_dict()  # every rank: gathers the full weights
    if not trainer.is_global_zero:
        return None
    model = GPT(pl_module.config)
    model.load_state_dict(model_state_dict({"state_dict": state}))
    return model.to(pl_module.device)
