"""Batched sampling over a KV cache: greedy, temperature, top-k and nucleus (top-p), prompts of any lengths,
past the context length by a sliding window, token by token.

`sample_stream` is the plain decoding loop, one token per row per forward pass; `gptlit.generation.draft` builds
drafted decoding on top of the same `CachedDecoding`, and `gptlit.generation.generate` chooses between them. Tokens
are picked by `gptlit.generation.sampling`. Nothing here imports the model: any module with `CausalLM`'s few methods
decodes.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from functools import cache, partial
from numbers import Integral, Real
from typing import Any, Protocol

import torch

from gptlit.errors import UsageError
from gptlit.generation.sampling import greedy as greedy  # gptlit.sampling (0.2.0, now this module) had them
from gptlit.generation.sampling import pick_ids, random_seed, uniform_numbers
from gptlit.generation.sampling import sample_next as sample_next

Prompts = torch.Tensor | Sequence[int] | Sequence[Sequence[int]]


class CausalLM(Protocol):
    """What decoding needs of a model (gptlit.model.gpt.GPT has it). A model may also have ``cached_pass()``: the
    same forward pass over its KV cache with less Python, made once the cache is set (`GPT.cached_pass`)."""

    config: Any  # .block_size and .vocab_size
    training: bool

    def __call__(self, idx: torch.Tensor, input_pos: torch.Tensor, cache_len: int) -> torch.Tensor: ...
    def set_kv_cache(self, batch_size: int, max_seq_len: int | None = None, device: Any = None) -> None: ...
    def clear_kv_cache(self) -> None: ...
    def parameters(self) -> Iterator[torch.nn.Parameter]: ...
    def train(self, mode: bool = True) -> Any: ...


def as_rows(prompt_ids: Prompts) -> list[list[int]]:
    """One prompt or several, as lists of ids."""
    if isinstance(prompt_ids, torch.Tensor):
        return [prompt_ids.tolist()] if prompt_ids.dim() == 1 else prompt_ids.tolist()
    if len(prompt_ids) > 0 and isinstance(prompt_ids[0], Integral):  # numpy integers too
        return [list(prompt_ids)]
    return [list(row) for row in prompt_ids]


def check_args(rows: list[list[int]], vocab_size: int) -> None:
    """Refuse prompts that cannot be decoded."""
    if not rows or any(len(row) == 0 for row in rows):
        raise UsageError("prompt_ids must hold at least one token per prompt (start from the <bos> id)")
    bad = [t for row in rows for t in row if not 0 <= t < vocab_size]
    if bad:
        raise UsageError(f"prompt_ids holds token id {bad[0]}, outside the model's vocabulary [0, {vocab_size})")


# What each sampling option accepts, in the words of its error.
SAMPLING_RANGES = {
    "max_new_tokens": "an integer >= 0",
    "temperature": "a finite number >= 0 (0 is greedy)",
    "top_k": "an integer >= 1, or null (no top-k)",
    "top_p": "a number in (0, 1], or null (no top-p)",
    "num_samples": "an integer >= 1",
    "seed": "a 64-bit integer (sample i uses seed + i), or null (a random seed)",
    "draft_tokens": "an integer >= 0 (0 feeds one token per pass)",
    "compile": "true or false",
}


def sampling_option_error(name: str, value: Any) -> UsageError:
    return UsageError(f"{name} must be {SAMPLING_RANGES[name]}, got {value}")


def _integer(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


_VALID: dict[str, Callable[[Any], bool]] = {
    "max_new_tokens": lambda v: _integer(v) and v >= 0,
    "temperature": lambda v: _number(v) and math.isfinite(v) and v >= 0,
    "top_k": lambda v: v is None or (_integer(v) and v >= 1),
    "top_p": lambda v: v is None or (_number(v) and 0 < v <= 1),
    "num_samples": lambda v: _integer(v) and v >= 1,
    "seed": lambda v: v is None or (_integer(v) and -(2**63) <= v < 2**64),
    "draft_tokens": lambda v: _integer(v) and v >= 0,
    "compile": lambda v: isinstance(v, bool),
}


def check_sampling_options(**values: Any) -> None:
    """Refuse the first of the given options outside its range (`SAMPLING_RANGES`, in that order), naming it;
    NaN and infinities included. With ``num_samples``, seed + num_samples - 1 must be a 64-bit seed too."""
    for name, valid in _VALID.items():
        if name in values and not valid(values[name]):
            raise sampling_option_error(name, values[name])
    seed = values.get("seed")
    if seed is not None and seed + values.get("num_samples", 1) > 2**64:
        raise sampling_option_error("seed", seed)


@dataclass(frozen=True)
class SamplingOptions:
    """How to continue a prompt, checked once when made: a value outside its range (`SAMPLING_RANGES`) raises
    a one-line `UsageError` naming it. ``dataclasses.replace(options, seed=1)`` makes a checked copy.

    Args:
        max_new_tokens: Tokens to add to each prompt, fewer if the prompt's end-of-text id comes first.
        temperature: Softmax temperature; 0 picks the most likely token (greedy).
        top_k: Sample only among the k most likely tokens (None: all).
        top_p: Sample only among the most likely tokens whose probabilities add up to top_p (nucleus; None: all).
        seed: The samples' seed: the same seed gives the same tokens, and torch's global random generator is
            left alone (None: a seed drawn from it). Row i of a batch samples as with its own seed.
        draft_tokens: Decoding of a single prompt checks up to this many guessed tokens per forward pass
            (`gptlit.generation.draft`); 0 feeds one token at a time. The tokens are the same either way.
        compile: Run the forward passes through ``torch.compile`` (seconds to compile on the first call,
            faster decoding after; the logits differ by float rounding).
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    draft_tokens: int = 8
    compile: bool = False

    def __post_init__(self) -> None:
        check_sampling_options(**{field.name: getattr(self, field.name) for field in fields(self)})


class CachedDecoding:
    """A decoding session: the model in eval mode with a KV cache for ``batch_size`` rows (cleared, and the
    model's mode restored, on exit), its forward passes (compiled or not) and the sliding window.

    The cache holds at most ``block_size`` positions. When it is full, the last ``block_size // 2`` tokens
    are kept and fed again from position 0. Where the window starts is a function of the sequence length
    alone (`window_start`), so a row in a batch slides exactly when it would alone.
    """

    def __init__(self, model: CausalLM, batch_size: int, compile: bool = False) -> None:
        self.model, self.batch_size, self.compile = model, batch_size, compile
        self.device = next(model.parameters()).device
        self.forward: Callable[..., torch.Tensor] = partial(_compiled_forward(), model) if compile else model
        self.window = model.config.block_size
        keep = max(1, self.window // 2)
        self.stride = self.window + 1 - keep  # the window moves by this much each time it is full

    def __enter__(self) -> CachedDecoding:
        self._was_training = self.model.training
        self.model.train(False)
        self.model.set_kv_cache(self.batch_size, self.window, device=self.device)
        cached_pass = getattr(self.model, "cached_pass", None)
        if not self.compile and cached_pass is not None:  # the same logits with less Python per pass
            self.forward = cached_pass()
        return self

    def __exit__(self, *exc: object) -> None:
        self.model.clear_kv_cache()
        self.model.train(self._was_training)

    def window_start(self, length: int) -> int:
        """First token the cache holds once it must hold tokens [:length]: 0, then a multiple of stride."""
        return self.stride * -(-max(0, length - self.window) // self.stride)

    def prefill(self, seqs: list[list[int]], start: int, end: int) -> torch.Tensor:
        """Feed tokens [start:end] of each row at positions 0.. into the cache; logits of the last, (B, V)."""
        return self.run([seq[start:end] for seq in seqs], 0)[:, -1]

    def run(self, fed: list[list[int]], pos: int) -> torch.Tensor:
        """Feed ``fed`` (B rows of T tokens) at cache positions pos..pos+T; their logits (B, T, V)."""
        ids = torch.tensor(fed, dtype=torch.long, device=self.device)  # (B, T)
        end = pos + ids.size(1)
        return self.forward(ids, torch.arange(pos, end, device=self.device), end)


def sample_stream(
    model: CausalLM, rows: list[list[int]], options: SamplingOptions, eos_id: int | None = None
) -> Iterator[dict[int, int]]:
    """Sample token by token; each step yields {row: new token id} for the rows still going.

    Rows may differ in length: all rows advance together from the shortest prompt's end, and a row still
    inside its own prompt is fed its prompt token instead of a sample. Every row thus sees the same positions
    it would alone, with no padding inside attention.
    """
    B, lengths, seqs = len(rows), [len(row) for row in rows], [list(row) for row in rows]
    new_counts, done = [0] * B, [False] * B
    filters = options.temperature, options.top_k, options.top_p
    seed = random_seed() if options.seed is None else options.seed
    with CachedDecoding(model, B, options.compile) as decoding:
        cur = min(lengths)
        start = decoding.window_start(cur)  # the cache holds tokens [start:cur] at positions 0..
        logits = decoding.prefill(seqs, start, cur)
        while True:
            step: dict[int, int] = {}
            uniforms = () if options.temperature == 0 else uniform_numbers(seed, ((i, cur) for i in range(B)))
            for i, token in enumerate(pick_ids(logits, uniforms, *filters)):
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
                done[i] = new_counts[i] == options.max_new_tokens
            if step:
                yield step
            cur += 1
            if all(done):
                return
            if cur - start > decoding.window:  # no room for token cur - 1: slide the window
                start = decoding.window_start(cur)
                logits = decoding.prefill(seqs, start, cur)
            else:
                logits = decoding.run([[seq[cur - 1]] for seq in seqs], cur - 1 - start)[:, -1]


def collect(
    stream: Iterator[dict[int, int]], n_rows: int, on_token: Callable[[int, int], None] | None = None
) -> list[list[int]]:
    """The new ids of each of ``n_rows`` rows from a decoding stream, passing each to ``on_token`` as it comes."""
    out: list[list[int]] = [[] for _ in range(n_rows)]
    try:
        for step in stream:
            for i, token in step.items():
                out[i].append(token)
                if on_token is not None:
                    on_token(i, token)
    finally:
        # If on_token raises, the stream's cleanup (cache cleared, train mode back) runs now, not whenever
        # the traceback that holds the suspended generator is freed.
        stream.close()  # type: ignore[attr-defined]
    return out


def _forward(model: CausalLM, idx: torch.Tensor, input_pos: torch.Tensor, cache_len: int) -> torch.Tensor:
    return model(idx, input_pos, cache_len)


@cache
def _compiled_forward() -> Callable[..., torch.Tensor]:
    """``_forward`` through ``torch.compile``, made on first use (importing the compiler takes a second): the
    fast path of a decoding pass, with the same tokens (tests/test_draft.py).

    Shapes are dynamic, so the graphs compiled for one architecture serve its other instances and every
    pass length; torch.compile still specializes batch 1, one-token passes and a full cache apart, up
    to 8 graphs per architecture, hence a higher limit where torch takes one (past the limit, passes
    run eagerly). The first passes compile (Inductor's disk cache shortens that in later processes). The C++
    wrapper calls the kernels without Python in between (the gain: `benchmarks/README.md`).
    """
    options: dict = {"dynamic": True, "options": {"cpp_wrapper": True}}
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        options["recompile_limit"] = 64
    return torch.compile(_forward, **options)
