"""The decoding pass over the KV cache (`GPT.cached_pass`) against its reference, `GPT.forward`: the same logits,
bit for bit, on every variant with the model's own products, and up to rounding in every form of them."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from helpers import VARIANTS, tiny_model

from gptlit.model.products import FORMS

# Sums in another order: logits of these models (up to ~5) differ by float32 rounding of their dot products.
ROUNDING = 1e-4


@contextmanager
def onednn(enabled: bool):
    """oneDNN on or off inside, as it was after."""
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = was


def passes(model, forward, idx: torch.Tensor) -> list[torch.Tensor]:
    """The logits of a decoding's passes through ``forward``: a prefill of 7 tokens, one token, 5 tokens (a pass
    with guesses), then one token at a time to the cache's end, then a prefill of the cache's second half."""
    L = idx.size(1)
    out = []
    for start, end in [(0, 7), (7, 8), (8, 13), *((t, t + 1) for t in range(13, L)), (0, L // 2)]:
        out.append(forward(idx[:, start:end], torch.arange(start, end), end))
    return out


@pytest.mark.parametrize("variant", [dict(use_rope=True), dict(use_rope=False), *VARIANTS], ids=str)
def test_cached_pass_gives_the_logits_of_forward_bit_for_bit(variant):
    model = tiny_model(block_size=24, **variant)
    idx = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), onednn(False):  # the cached pass runs without it
        model.set_kv_cache(batch_size=2)
        reference = passes(model, model, idx)
        model.set_kv_cache(batch_size=2)
        cached = passes(model, model.cached_pass(products="linear"), idx)
    for theirs, ours in zip(reference, cached, strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("variant", [dict(), *VARIANTS], ids=str)
def test_each_form_of_the_products_gives_the_logits_of_forward_up_to_rounding(variant, form):
    model = tiny_model(block_size=24, **variant)
    idx = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode(), onednn(False):
        model.set_kv_cache(batch_size=2)
        reference = passes(model, model, idx)
        model.set_kv_cache(batch_size=2)
        cached = passes(model, model.cached_pass(products=form), idx)
    for theirs, ours in zip(reference, cached, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=ROUNDING, atol=ROUNDING)


def test_with_onednn_on_it_differs_from_forward_by_rounding_only():
    model = tiny_model(block_size=24)
    idx = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        model.set_kv_cache(batch_size=2)
        reference = passes(model, model, idx)
        model.set_kv_cache(batch_size=2)
        cached = passes(model, model.cached_pass(), idx)
    for theirs, ours in zip(reference, cached, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=ROUNDING, atol=ROUNDING)


def test_onednn_is_set_back_after_a_pass_even_a_failed_one():
    model = tiny_model(block_size=24)
    model.set_kv_cache(batch_size=1)
    cached = model.cached_pass()
    with torch.inference_mode():
        for setting in (True, False):
            with onednn(setting):
                cached(torch.tensor([[1, 2]]), torch.arange(2), 2)
                assert torch.backends.mkldnn.enabled == setting
                with pytest.raises(IndexError):
                    cached(torch.tensor([[10_000]]), torch.arange(2, 3), 3)  # an id outside the vocabulary
                assert torch.backends.mkldnn.enabled == setting


def test_cached_pass_needs_eval_mode_and_a_kv_cache():
    model = tiny_model()
    with pytest.raises(RuntimeError, match="set_kv_cache"):
        model.cached_pass()
    model.set_kv_cache(batch_size=1)
    model.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        model.cached_pass()
