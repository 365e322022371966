"""Cross-entropy through the output head in chunks, without materializing the (tokens, vocab) logits.

For a small model the logits dwarf everything else: they are vocab_size / embed_dim times the size of the
hidden states, and the float32 softmax over them, its gradient and the casts can cost more than all the
transformer blocks' matrix products on a CPU. Here each chunk of rows goes through head, softmax and both
gradient products while it is still in cache, and only the gradients (the size of the inputs) are kept.

`linear_cross_entropy` is the plain reference that `chunked_cross_entropy` must equal (tests/test_loss.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the logits ``h @ weight.T`` against ``targets``: the plain reference."""
    return F.cross_entropy(F.linear(h, weight), targets)


def chunked_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 256
) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` (h: (N, C), weight: (V, C)) against ``targets`` (N,).

    Equal to `linear_cross_entropy`, gradients included, in a fraction of the memory traffic. Without
    gradients to compute (``torch.no_grad``, ``torch.inference_mode``: evaluation) only the value is.
    """
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(h, weight, targets, chunk_size)
    total, _, _ = _chunked_pass(h, weight, targets, chunk_size, need_grad=False)
    return total / h.size(0)


def _chunked_pass(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The summed loss over all rows and, with ``need_grad``, the gradients of the mean loss wrt h and weight."""
    n, device = h.size(0), h.device.type
    # Under autocast the products run in its dtype (bf16), as F.linear would; cast once, not per chunk.
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    w = weight.to(dtype)  # (V, C)
    grad_h = torch.empty_like(h) if need_grad else None
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
    total = torch.zeros((), device=h.device, dtype=torch.float32)
    with torch.autocast(device, enabled=False):
        for start in range(0, n, chunk_size):
            h_c = h[start : start + chunk_size].to(dtype)  # (c, C)
            y_c = targets[start : start + chunk_size]  # (c,)
            logits = (h_c @ w.t()).float()  # (c, V): softmax in float32
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            total += (lse - logits.gather(1, y_c[:, None]).squeeze(1)).sum()
            if grad_h is not None and grad_w is not None:
                # d(mean loss)/d(logits) = (softmax - one_hot(y)) / n, computed in place over the logits.
                grad_logits = logits.sub_(lse[:, None]).exp_()
                grad_logits[torch.arange(len(y_c), device=h.device), y_c] -= 1.0
                grad_logits = grad_logits.div_(n).to(dtype)  # (c, V)
                grad_h[start : start + chunk_size] = grad_logits @ w  # (c, C)
                grad_w += grad_logits.t() @ h_c  # (V, C)
    return total, grad_h, grad_w


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and both gradients chunk by chunk; backward only scales them."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
        total, grad_h, grad_w = _chunked_pass(h, weight, targets, chunk_size, need_grad=True)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / h.size(0)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, (grad_w * grad_out).to(ctx.weight_dtype), None, None
