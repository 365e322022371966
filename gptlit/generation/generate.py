"""Sampling from a GPT with its KV cache: greedy (with drafted tokens), temperature, top-k and nucleus (top-p).

The entry points. The plain batched loop is `gptlit.generation.decoding.sample_stream`; decoding of a single prompt
goes through `gptlit.generation.draft.drafted_stream`, which gives the same tokens in fewer forward passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import fields

import torch

from gptlit.errors import UsageError
from gptlit.generation.decoding import CausalLM, Prompts, SamplingOptions, as_rows, check_args, collect, sample_stream
from gptlit.generation.draft import NgramTable, drafted_stream
from gptlit.generation.sampling import greedy, sample_next

__all__ = ["SamplingOptions", "generate", "generate_stream", "greedy", "sample_next"]

_DEFAULTS = {field.name: field.default for field in fields(SamplingOptions)}


def sampling_options(options: SamplingOptions | None, max_new_tokens: int | None, **keywords) -> SamplingOptions:
    """``options``, or the options the keywords (``temperature=``...) make; refuses a keyword given beside
    ``options`` (one left at its default is no keyword given)."""
    if options is None:
        if max_new_tokens is None:
            raise UsageError("max_new_tokens is missing: pass it, or options=SamplingOptions(max_new_tokens, ...)")
        return SamplingOptions(max_new_tokens, **keywords)
    if not isinstance(options, SamplingOptions):
        raise UsageError(f"options must be a SamplingOptions, got {type(options).__name__}")
    given = [name for name, value in keywords.items() if value != _DEFAULTS[name]]
    if max_new_tokens is not None or given:
        name = "max_new_tokens" if max_new_tokens is not None else given[0]
        raise UsageError(f"{name} is given both as an argument and in options=: give it in options only")
    return options


@torch.inference_mode()
def generate_stream(
    model: CausalLM,
    prompt_ids: Prompts,
    max_new_tokens: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    draft_tokens: int = 8,
    draft_table: NgramTable | None = None,
    compile: bool = False,
    *,
    options: SamplingOptions | None = None,
) -> Iterator[dict[int, int]]:
    """Generate token by token; each step yields {prompt index: new token id} for the prompts still going.

    The sampling options come as ``options`` (a `SamplingOptions`) or as the keywords ``max_new_tokens``,
    ``temperature``, ``top_k``, ``top_p``, ``seed``, ``draft_tokens`` and ``compile``, which make one.

    Prompts may differ in length: every row sees the positions it would alone, with no padding inside
    attention. When the context reaches block_size, the last block_size // 2 tokens are kept, fed again from
    position 0 to refill the cache, and generation goes on; a row in a batch slides exactly when it would
    alone (`gptlit.generation.decoding`).

    Decoding of one prompt feeds, with each token, up to ``draft_tokens`` guesses of the tokens after it
    (`gptlit.generation.draft.NgramDraft`, helped by the corpus continuations of ``draft_table``) and keeps those
    equal to the token the model's logits pick at their position: one forward pass can then yield several tokens,
    and the tokens are those of one token per pass, greedy or sampled with the same seed (a sample is a function
    of the logits, the seed, the row and the position: `gptlit.generation.sampling`; equal up to float rounding of
    the logits, as with any change of batch shape).

    ``compile`` runs the forward passes through ``torch.compile``: the first call compiles for some
    seconds, later ones decode faster (benchmarks/README.md); the logits differ by float rounding.
    """
    keywords = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, draft_tokens=draft_tokens)
    options = sampling_options(options, max_new_tokens, compile=compile, **keywords)
    rows = as_rows(prompt_ids)
    check_args(rows, model.config.vocab_size)
    if draft_table is not None and draft_table.vocab_size > model.config.vocab_size:
        raise UsageError(
            f"draft_table is of a {draft_table.vocab_size}-token vocabulary, larger than the model's "
            f"{model.config.vocab_size}: build it from the data the model was trained on"
        )
    if options.max_new_tokens == 0:
        return
    if len(rows) == 1 and options.draft_tokens > 0:
        yield from drafted_stream(model, rows[0], options, eos_id, draft_table)
    else:
        yield from sample_stream(model, rows, options, eos_id)


def generate(
    model: CausalLM,
    prompt_ids: Prompts,
    max_new_tokens: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    on_token: Callable[[int, int], None] | None = None,
    draft_tokens: int = 8,
    draft_table: NgramTable | None = None,
    compile: bool = False,
    *,
    options: SamplingOptions | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns the new ids of each prompt.

    ``generate(model, ids, options=SamplingOptions(200, temperature=0))`` is
    ``generate(model, ids, 200, temperature=0)``: the options, checked once, or the keywords that make them
    (not both).

    Args:
        model: The GPT to sample from (its train/eval mode is restored afterwards).
        prompt_ids: One prompt (a list of ids or a 1-D tensor), or several (a list of lists, or a 2-D tensor).
        max_new_tokens, temperature, top_k, top_p, seed, draft_tokens, compile: The `SamplingOptions`.
        eos_id: Stop a prompt's continuation at this id (not included in the output).
        on_token: Called as ``on_token(prompt_index, token_id)`` for each new token, as it is produced.
        draft_table: Continuations seen in a corpus, guessed where the text so far offers none (decoding of
            one prompt, see `generate_stream`): the training data's (`NgramTable.from_data_dir`)
            or the model's own greedy continuations (`NgramTable.from_model`). More tokens per pass, the
            same tokens.
        options: The sampling options as one `SamplingOptions`, instead of the keywords.
    """
    keywords = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, draft_tokens=draft_tokens)
    options = sampling_options(options, max_new_tokens, compile=compile, **keywords)
    rows = as_rows(prompt_ids)
    stream = generate_stream(model, rows, eos_id=eos_id, draft_table=draft_table, options=options)
    return collect(stream, len(rows), on_token)
