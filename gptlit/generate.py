"""Sampling from a GPT with its KV cache: greedy (with drafted tokens), temperature, top-k and nucleus (top-p)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from functools import cache, partial

import torch

from gptlit.draft import NgramDraft, NgramTable
from gptlit.errors import UsageError
from gptlit.model import GPT

Prompts = torch.Tensor | Sequence[int] | Sequence[Sequence[int]]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token id of each row of logits (..., V), the first on a tie: ``argmax(dim=-1)``.

    ``max(dim=-1).indices`` is the same index, and on a CPU 3-4x faster than ``argmax`` over several rows.
    """
    return logits.max(dim=-1).indices


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token id per row from logits (B, V); temperature 0 is greedy. Returns (B,)."""
    if temperature == 0:
        return greedy(logits)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the first always stays.
        drop = probs.cumsum(dim=-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)


def _as_rows(prompt_ids: Prompts) -> list[list[int]]:
    if isinstance(prompt_ids, torch.Tensor):
        return [prompt_ids.tolist()] if prompt_ids.dim() == 1 else prompt_ids.tolist()
    if len(prompt_ids) > 0 and isinstance(prompt_ids[0], int):
        return [list(prompt_ids)]
    return [list(row) for row in prompt_ids]


def _check_args(rows, vocab_size, max_new_tokens, temperature, top_k, top_p, draft_tokens) -> None:
    if not rows or any(len(row) == 0 for row in rows):
        raise UsageError("prompt_ids must hold at least one token per prompt (start from the <bos> id)")
    bad = [t for row in rows for t in row if not 0 <= t < vocab_size]
    if bad:
        raise UsageError(f"prompt_ids holds token id {bad[0]}, outside the model's vocabulary [0, {vocab_size})")
    if not isinstance(draft_tokens, int) or draft_tokens < 0:
        raise UsageError(f"draft_tokens must be an int >= 0 (0 feeds one token per pass), got {draft_tokens!r}")
    if max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise UsageError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UsageError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UsageError(f"top_p must be in (0, 1] or None, got {top_p}")


def _feed(forward, fed: list[list[int]], pos: int, device) -> tuple[torch.Tensor, list[int]]:
    """Feed ``fed`` (B rows of 1 + len(guess) tokens: the last token, then guesses of row 0 when B is 1)
    at cache positions pos..; returns the logits (B, V) after the last accepted token, and the accepted
    guesses: the longest prefix of the guesses that greedy decoding would itself have produced.
    """
    ids = torch.tensor(fed, dtype=torch.long, device=device)  # (B, 1 + len(guess))
    end = pos + ids.size(1)
    logits = forward(ids, torch.arange(pos, end, device=device), end)  # (B, 1 + len(guess), V)
    accepted: list[int] = []
    guess = fed[0][1:]
    if guess:
        predicted = greedy(logits[0, :-1]).tolist()  # the greedy token after each fed one
        for token, expected in zip(guess, predicted, strict=True):
            if token != expected:
                break
            accepted.append(token)
    # Keys and values of rejected guesses stay in the cache past the accepted positions: no query
    # attends to a position after its own, and the next tokens fed overwrite them.
    return logits[:, len(accepted)], accepted


def _forward(model: GPT, idx: torch.Tensor, input_pos: torch.Tensor, cache_len: int) -> torch.Tensor:
    return model(idx, input_pos, cache_len)


@cache
def _compiled_forward() -> Callable[..., torch.Tensor]:
    """``_forward`` through ``torch.compile``, made on first use (importing the compiler takes a second).

    Shapes are dynamic, so the graphs compiled for one architecture serve its other instances and every
    pass length; torch.compile still specializes batch 1, one-token passes and a full cache apart, up
    to 8 graphs per architecture, hence a higher limit where torch takes one (past the limit, passes
    run eagerly). The first passes compile (15-20 s on a small CPU; Inductor's disk cache makes later
    processes start in 1-2 s). The C++ wrapper calls the kernels without Python in between: ~8% faster
    decoding on a CPU.
    """
    options: dict = {"dynamic": True, "options": {"cpp_wrapper": True}}
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        options["recompile_limit"] = 64
    return torch.compile(_forward, **options)


@torch.inference_mode()
def generate_stream(
    model: GPT,
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

    Prompts may differ in length: all rows advance together from the shortest prompt's end, and a row
    still inside its own prompt is fed its prompt token instead of a sample. Every row thus sees the
    same positions it would alone, with no padding inside attention.

    When the context reaches block_size, the last block_size // 2 tokens are kept, fed again from
    position 0 to refill the cache, and generation goes on. Where the window starts is a function of
    the sequence length alone (a prompt longer than block_size is cut on the same schedule), so a row
    in a batch slides exactly when it would alone.

    Greedy decoding of one prompt feeds, with each token, up to ``draft_tokens`` guesses of the tokens
    after it (`gptlit.draft.NgramDraft`, helped by the corpus continuations of ``draft_table``) and keeps
    those the model's own argmax confirms: one forward pass can then yield several tokens, and the
    tokens are the greedy ones (equal up to float rounding of the logits, as with any change of batch
    shape).

    ``compile`` runs the forward passes through ``torch.compile``: the first call compiles for some
    seconds, later ones decode faster (benchmarks/README.md); the logits differ by float rounding.
    """
    rows = _as_rows(prompt_ids)
    config = model.config
    _check_args(rows, config.vocab_size, max_new_tokens, temperature, top_k, top_p, draft_tokens)
    if draft_table is not None and draft_table.vocab_size > config.vocab_size:
        raise UsageError(
            f"draft_table is of a {draft_table.vocab_size}-token vocabulary, larger than the model's "
            f"{config.vocab_size}: build it from the data the model was trained on"
        )
    if max_new_tokens == 0:
        return
    device = model.wte.weight.device
    forward = partial(_compiled_forward(), model) if compile else model
    B, lengths = len(rows), [len(row) for row in rows]
    seqs = [list(row) for row in rows]  # each prompt, then the tokens that follow it
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    window, keep = config.block_size, max(1, config.block_size // 2)
    stride = window + 1 - keep  # the window moves by this much each time it is full
    new_counts = [0] * B
    done = [False] * B

    def window_start(length: int) -> int:
        """First token the cache holds once it must hold tokens [:length]: 0, then a multiple of stride."""
        return stride * -(-max(0, length - window) // stride)

    def prefill(start: int, end: int) -> torch.Tensor:
        """Feed tokens [start:end] of each row at positions 0.. into the cache; logits of the last, (B, V)."""
        ids = torch.tensor([seq[start:end] for seq in seqs], dtype=torch.long, device=device)  # (B, end - start)
        return forward(ids, torch.arange(end - start, device=device), end - start)[:, -1]

    drafts = NgramDraft(rows[0], table=draft_table) if B == 1 and temperature == 0 and draft_tokens > 0 else None
    confirmed: list[int] = []  # drafted tokens the model confirmed, already in the cache, still to be emitted
    was_training = model.training
    model.eval()
    model.set_kv_cache(B, window, device=device)
    try:
        cur = min(lengths)
        start = window_start(cur)  # the cache holds tokens [start:cur] at positions 0..
        logits = prefill(start, cur)
        while True:
            drafted = bool(confirmed)  # a confirmed guess: its keys and values are in the cache already
            next_ids = [confirmed.pop(0)] if drafted else sample_next(logits, temperature, top_k, top_p, generator)
            step: dict[int, int] = {}
            for i, token in enumerate(next_ids if drafted else next_ids.tolist()):
                if cur < lengths[i]:  # still reading its prompt: the sample is dropped
                    continue
                seqs[i].append(token)
                if done[i]:
                    continue
                if token == eos_id:
                    done[i] = True
                    continue
                step[i] = token
                new_counts[i] += 1
                done[i] = new_counts[i] == max_new_tokens
            if drafts is not None:
                drafts.append(seqs[0][cur])
            if step:
                yield step
            cur += 1
            if all(done):
                return
            if drafted:
                continue  # the pass that confirmed it gave what follows: the next guess, or logits after the last
            if cur - start > window:  # no room for token cur - 1: slide the window
                start = window_start(cur)  # = cur - keep
                logits = prefill(start, cur)
                continue
            guess: list[int] = []
            if drafts is not None:
                # Guesses must fit in the window; past the tokens still wanted they would only cost time.
                room = min(draft_tokens, window - (cur - start), max_new_tokens - new_counts[0] - 1)
                guess = drafts.propose(room)
            fed = [[seqs[0][cur - 1], *guess]] if guess else [[seq[cur - 1]] for seq in seqs]
            logits, confirmed = _feed(forward, fed, cur - 1 - start, device)
    finally:
        model.clear_kv_cache()
        model.train(was_training)


def generate(
    model: GPT,
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
    rows = _as_rows(prompt_ids)
    out: list[list[int]] = [[] for _ in rows]
    stream = generate_stream(
        model, rows, max_new_tokens, temperature, top_k, top_p, eos_id, seed, draft_tokens, draft_table, compile
    )
    # closing: if on_token raises, the stream's cleanup (cache cleared, train mode back) runs now,
    # not whenever the traceback that holds the suspended generator is freed.
    with contextlib.closing(stream):
        for step in stream:
            for i, token in step.items():
                out[i].append(token)
                if on_token is not None:
                    on_token(i, token)
    return out
