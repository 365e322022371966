"""The chunked head + cross-entropy gives the loss and gradients of the plain logits path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gptlit.model.config import GPTConfig
from gptlit.model.gpt import GPT
from gptlit.model.loss import chunked_cross_entropy, linear_cross_entropy


@pytest.mark.parametrize("chunk_size", [7, 64, 1000])
def test_loss_and_gradients_equal_the_plain_path(chunk_size: int) -> None:
    torch.manual_seed(0)
    h = torch.randn(50, 16, requires_grad=True)
    w = torch.randn(97, 16, requires_grad=True)
    y = torch.randint(0, 97, (50,))
    plain = F.cross_entropy(F.linear(h, w), y)
    plain_grads = torch.autograd.grad(plain * 3.0, (h, w))  # a non-unit upstream gradient too
    chunked = chunked_cross_entropy(h, w, y, chunk_size)
    chunked_grads = torch.autograd.grad(chunked * 3.0, (h, w))
    torch.testing.assert_close(chunked, plain)
    for ours, reference in zip(chunked_grads, plain_grads, strict=True):
        torch.testing.assert_close(ours, reference)


def test_model_loss_matches_cross_entropy_of_its_logits_for_every_parameter() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=101, block_size=16, embed_dim=32, n_heads=2, n_layers=2, dropout=0.0))
    x, y = torch.randint(0, 101, (3, 16)), torch.randint(0, 101, (3, 16))
    reference = F.cross_entropy(model(x).view(-1, 101), y.view(-1))
    reference_grads = torch.autograd.grad(reference, list(model.parameters()))
    loss = model.loss(x, y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, reference)
    for (name, _), ours, theirs in zip(model.named_parameters(), grads, reference_grads, strict=True):
        torch.testing.assert_close(ours, theirs, msg=name)  # the tied wte/lm_head matrix included


def test_bf16_autocast_stays_close_to_the_autocast_plain_path() -> None:
    torch.manual_seed(0)
    h = torch.randn(300, 64, requires_grad=True)
    w = (torch.randn(500, 64) * 0.1).requires_grad_()
    y = torch.randint(0, 500, (300,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.cross_entropy(F.linear(h, w), y)
        chunked = chunked_cross_entropy(h, w, y, 128)
    plain_grads = torch.autograd.grad(plain, (h, w))
    chunked_grads = torch.autograd.grad(chunked, (h, w))
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, rtol=1e-2, atol=1e-2)
    for ours, reference in zip(chunked_grads, plain_grads, strict=True):
        assert ours.dtype == reference.dtype == torch.float32
        torch.testing.assert_close(ours, reference, rtol=5e-2, atol=1e-4)


def test_without_gradients_only_the_value_is_computed() -> None:
    torch.manual_seed(0)
    h, w, y = torch.randn(20, 8), torch.randn(30, 8), torch.randint(0, 30, (20,))
    with torch.inference_mode():
        value = chunked_cross_entropy(h, w, y, 6)
    torch.testing.assert_close(value, F.cross_entropy(h @ w.t(), y))


class CountMatmuls(TorchDispatchMode):
    """Counts the matrix products that run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode])
def test_evaluation_does_the_forward_work_only(no_grad) -> None:
    """Under Lightning's validation (no_grad / inference_mode) the loss costs what logits + cross-entropy cost,
    although the head's weight is a Parameter that requires grad."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=101, block_size=16, embed_dim=32, n_heads=2, n_layers=2, dropout=0.0))
    x, y = torch.randint(0, 101, (3, 16)), torch.randint(0, 101, (3, 16))  # 48 rows: one chunk
    with no_grad(), CountMatmuls() as chunked:
        loss = model.loss(x, y)
    with no_grad(), CountMatmuls() as plain:
        reference = linear_cross_entropy(model.hidden_states(x).flatten(0, 1), model.lm_head.weight, y.flatten())
    assert chunked.count == plain.count
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, reference)


def test_targets_may_be_a_slice_of_one_buffer() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=101, block_size=16, embed_dim=32, n_heads=2, n_layers=1, dropout=0.0))
    buf = torch.randint(0, 101, (3, 17))
    x, y = buf[:, :-1], buf[:, 1:]  # nanoGPT style: y is not contiguous
    reference = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    torch.testing.assert_close(model.loss(x, y), reference)
