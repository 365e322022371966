"""Sampling from a GPT with its KV cache: greedy (with drafted tokens), temperature, top-k and nucleus (top-p).

The entry points. The plain batched loop is `gptlit.generation.decoding.sample_stream`; greedy decoding of a
single prompt goes through `gptlit.generation.draft.drafted_greedy_stream`, which gives the same tokens in fewer
forward passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from gptlit.errors import UsageError
from gptlit.generation.decoding import (
    CausalLM,
    Prompts,
    as_rows,
    check_args,
    check_sampling_options,
    collect,
    greedy,
    sample_next,
    sample_stream,
)
from gptlit.generation.draft import NgramTable, drafted_greedy_stream

__all__ = ["generate", "generate_stream", "greedy", "sample_next"]


@torch.inference_mode()
def generate_stream(
    model: CausalLM,
    prompt_ids: Prompts,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    draft_tokens: int = 8,
    draft_table: NgramTable | None = None,
    compile: bool = False,
) -> Iterator[dict[int, int]]:
    """Generate token by token; each step yields {prompt index: new token id} for the prompts still going.

    Prompts may differ in length: every row sees the positions it would alone, with no padding inside
    attention. When the context reaches block_size, the last block_size // 2 tokens are kept, fed again from
    position 0 to refill the cache, and generation goes on; a row in a batch slides exactly when it would
    alone (`gptlit.generation.decoding`).

    Greedy decoding of one prompt feeds, with each token, up to ``draft_tokens`` guesses of the tokens
    after it (`gptlit.generation.draft.NgramDraft`, helped by the corpus continuations of ``draft_table``) and keeps
    those the model's own argmax confirms: one forward pass can then yield several tokens, and the
    tokens are the greedy ones (equal up to float rounding of the logits, as with any change of batch
    shape).

    ``compile`` runs the forward passes through ``torch.compile``: the first call compiles for some
    seconds, later ones decode faster (benchmarks/README.md); the logits differ by float rounding.
    """
    rows = as_rows(prompt_ids)
    check_args(rows, model.config.vocab_size)
    check_sampling_options(max_new_tokens, temperature, top_k, top_p, seed=seed)
    if not isinstance(draft_tokens, int) or draft_tokens < 0:
        raise UsageError(f"draft_tokens must be an int >= 0 (0 feeds one token per pass), got {draft_tokens!r}")
    if draft_table is not None and draft_table.vocab_size > model.config.vocab_size:
        raise UsageError(
            f"draft_table is of a {draft_table.vocab_size}-token vocabulary, larger than the model's "
            f"{model.config.vocab_size}: build it from the data the model was trained on"
        )
    if max_new_tokens == 0:
        return
    if len(rows) == 1 and temperature == 0 and draft_tokens > 0:
        yield from drafted_greedy_stream(model, rows[0], max_new_tokens, eos_id, draft_tokens, draft_table, compile)
    else:
        yield from sample_stream(model, rows, max_new_tokens, temperature, top_k, top_p, eos_id, seed, compile)


def generate(
    model: CausalLM,
    prompt_ids: Prompts,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    on_token: Callable[[int, int], None] | None = None,
    draft_tokens: int = 8,
    draft_table: NgramTable | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns the new ids of each prompt.

    Args:
        model: The GPT to sample from (its train/eval mode is restored afterwards).
        prompt_ids: One prompt (a list of ids or a 1-D tensor), or several (a list of lists, or a 2-D tensor).
        max_new_tokens: Tokens to add to each prompt, fewer if ``eos_id`` comes first.
        temperature: Softmax temperature; 0 picks the most likely token (greedy).
        top_k: Sample only among the k most likely tokens.
        top_p: Sample only among the most likely tokens whose probabilities add up to top_p (nucleus).
        eos_id: Stop a prompt's continuation at this id (not included in the output).
        seed: Seed of a private random generator: the same seed gives the same samples, and the
            global RNG is left alone.
        on_token: Called as ``on_token(prompt_index, token_id)`` for each new token, as it is produced.
        draft_tokens: Greedy decoding of a single prompt checks up to this many guessed tokens per forward
            pass (see `generate_stream`); 0 feeds one token at a time. The tokens are the same either way.
        draft_table: Continuations seen in a corpus, guessed where the text so far offers none: the
            training data's (`NgramTable.from_data_dir`) or the model's own greedy continuations
            (`NgramTable.from_model`). More tokens per pass, the same tokens.
        compile: Run the forward passes through ``torch.compile`` (seconds to compile on the first call,
            faster decoding after).
    """
    rows = as_rows(prompt_ids)
    options = dict(draft_tokens=draft_tokens, draft_table=draft_table, compile=compile)
    stream = generate_stream(model, rows, max_new_tokens, temperature, top_k, top_p, eos_id, seed, **options)
    return collect(stream, len(rows), on_token)
