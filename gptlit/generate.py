"""Sampling from a GPT with its KV cache: greedy, temperature, top-k and nucleus (top-p)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from gptlit.draft import NgramDraft
from gptlit.model import GPT

Prompts = torch.Tensor | Sequence[int] | Sequence[Sequence[int]]


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token id per row from logits (B, V); temperature 0 is greedy. Returns (B,)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
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
        raise ValueError("prompt_ids must hold at least one token per prompt (start from the <bos> id)")
    bad = [t for row in rows for t in row if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt_ids holds token id {bad[0]}, outside the model's vocabulary [0, {vocab_size})")
    if not isinstance(draft_tokens, int) or draft_tokens < 0:
        raise ValueError(f"draft_tokens must be an int >= 0 (0 feeds one token per pass), got {draft_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def _feed(model: GPT, last: torch.Tensor, guess: list[int], pos: int) -> tuple[torch.Tensor, list[int]]:
    """Feed last (B, 1) at cache position pos, followed by the guessed tokens of row 0 (B must be 1 then).

    Returns the logits (B, V) after the last accepted token, and the accepted guesses: the
    longest prefix of ``guess`` that greedy decoding would itself have produced.
    """
    fed = torch.cat((last, torch.tensor([guess], dtype=torch.long, device=last.device)), dim=1) if guess else last
    input_pos = torch.arange(pos, pos + fed.size(1), device=last.device)
    logits = model(fed, input_pos=input_pos)  # (B, 1 + len(guess), V)
    accepted: list[int] = []
    if guess:
        predicted = logits[0, :-1].argmax(dim=-1).tolist()  # the greedy token after each fed one
        for token, greedy in zip(guess, predicted, strict=True):
            if token != greedy:
                break
            accepted.append(token)
    # Keys and values of rejected guesses stay in the cache past the accepted positions: no query
    # attends to a position after its own, and the next tokens fed overwrite them.
    return logits[:, len(accepted)], accepted


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
    after it (`gptlit.draft.NgramDraft`) and keeps those the model's own argmax confirms: one forward pass
    can then yield several tokens, and the tokens are the greedy ones (equal up to float rounding of
    the logits, as with any change of batch shape).
    """
    rows = _as_rows(prompt_ids)
    config = model.config
    _check_args(rows, config.vocab_size, max_new_tokens, temperature, top_k, top_p, draft_tokens)
    if max_new_tokens == 0:
        return
    device = model.wte.weight.device
    lengths = torch.tensor([len(row) for row in rows], device=device)  # (B,)
    B, total = len(rows), max(len(row) for row in rows) + max_new_tokens
    tokens = torch.zeros(B, total, dtype=torch.long, device=device)  # (B, total): prompts, then samples
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    window, keep = config.block_size, max(1, config.block_size // 2)
    stride = window + 1 - keep  # the window moves by this much each time it is full
    new_counts = [0] * B
    done = [False] * B

    def window_start(length: int) -> int:
        """First token the cache holds once it must hold tokens[:, :length]: 0, then a multiple of stride."""
        return stride * -(-max(0, length - window) // stride)

    def prefill(start: int, end: int) -> torch.Tensor:
        """Feed tokens[:, start:end] at positions 0.. into a fresh cache; logits of the last, (B, V)."""
        input_pos = torch.arange(end - start, device=device)
        return model(tokens[:, start:end], input_pos=input_pos)[:, -1]

    drafts = NgramDraft(rows[0]) if B == 1 and temperature == 0 and draft_tokens > 0 else None
    confirmed: list[int] = []  # drafted tokens the model confirmed, already in the cache, still to be emitted
    was_training = model.training
    model.eval()
    model.set_kv_cache(B, window, device=device)
    try:
        cur = int(lengths.min())
        start = window_start(cur)  # the cache holds tokens[:, start:cur] at positions 0..
        logits = prefill(start, cur)
        while True:
            drafted = bool(confirmed)  # a confirmed guess: its keys and values are in the cache already
            if drafted:
                next_ids = torch.tensor([confirmed.pop(0)], device=device)  # (1,)
            else:
                next_ids = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            in_prompt = cur < lengths  # (B,) rows still reading their prompt
            next_ids = torch.where(in_prompt, tokens[:, cur], next_ids)
            tokens[:, cur] = next_ids
            if drafts is not None:
                drafts.append(int(next_ids[0]))
            step: dict[int, int] = {}
            for i, (token, reading) in enumerate(zip(next_ids.tolist(), in_prompt.tolist(), strict=True)):
                if done[i] or reading:
                    continue
                if token == eos_id:
                    done[i] = True
                    continue
                step[i] = token
                new_counts[i] += 1
                done[i] = new_counts[i] == max_new_tokens
            if step:
                yield step
            cur += 1
            if all(done):
                return
            if drafted:
                continue  # the pass that confirmed it gave what follows: the next guess, or logits after the last
            if cur - start > window:  # no room for tokens[:, cur - 1]: slide the window
                start = window_start(cur)  # = cur - keep
                logits = prefill(start, cur)
                continue
            guess: list[int] = []
            if drafts is not None:
                # Guesses must fit in the window; past the tokens still wanted they would only cost time.
                room = min(draft_tokens, window - (cur - start), max_new_tokens - new_counts[0] - 1)
                guess = drafts.propose(room)
            logits, confirmed = _feed(model, tokens[:, cur - 1 : cur], guess, cur - 1 - start)
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
    """
    rows = _as_rows(prompt_ids)
    out: list[list[int]] = [[] for _ in rows]
    stream = generate_stream(model, rows, max_new_tokens, temperature, top_k, top_p, eos_id, seed, draft_tokens)
    # closing: if on_token raises, the stream's cleanup (cache cleared, train mode back) runs now,
    # not whenever the traceback that holds the suspended generator is freed.
    with contextlib.closing(stream):
        for step in stream:
            for i, token in step.items():
                out[i].append(token)
                if on_token is not None:
                    on_token(i, token)
    return out
