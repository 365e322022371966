"""Rotary position embeddings (RoPE) and the split of the fused qkv projection into rotated heads.

`split_heads` has two implementations of one computation. The plain one (`split_and_rotate`: view,
permute, `apply_rope`, unbind) is what inference and `torch.compile` run; Inductor fuses it. In eager
training, autograd's gradient of that chain zero-fills and adds full-size buffers for each slice and
copies the permuted gradient back into the projection's layout; `RotaryQKV` writes each gradient
straight into its place instead, which makes eager training steps faster (measured in `benchmarks/README.md`).
"""

from __future__ import annotations

import torch
from torch import nn


def build_rope_cache(seq_len: int, head_size: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (seq_len, head_size), in the rotate-half layout of GPT-NeoX and Llama.

    Channel i and channel i + head_size/2 form one rotating pair, with frequency base^(-2i/head_size). The sin
    table's first half is negated: a rotation is then ``x * cos + x.roll(head_size // 2, -1) * sin`` (`apply_rope`).
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))  # (hs/2,)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (T, hs/2)
    sin = angles.sin()
    return torch.cat((angles, angles), dim=-1).cos(), torch.cat((-sin, sin), dim=-1)  # (T, hs) each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, hs) by the angles of its positions; cos and sin are (T, hs), sin's first half negated.

    With (x1, x2) the halves of a head's channels: (x1 c - x2 s, x2 c + x1 s). Rolling x by half its channels puts
    x2 where x1 was and x1 where x2 was; the negated half of sin gives -x2 s. One operation in place of slicing,
    negating and concatenating rotate_half(x), with the same result, bit for bit.
    """
    return (x * cos + x.roll(x.size(-1) // 2, -1) * sin).to(x.dtype)


def split_heads(
    qkv: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    norms: tuple[nn.Module, nn.Module] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, nh, T, hs), k and v (B, nkv, T, hs) from the fused projection qkv (B, T, (nh + 2 nkv) * hs): q and
    k normed by ``norms`` (QK-norm) when given, then rotated by rope's cos and sin (T, hs) when given."""
    if rope is not None and norms is None and qkv.requires_grad and not torch.compiler.is_compiling():
        return RotaryQKV.apply(qkv, *rope, n_heads, n_kv_heads)
    return split_and_rotate(qkv, n_heads, n_kv_heads, rope, norms)


def split_and_rotate(
    qkv: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    norms: tuple[nn.Module, nn.Module] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`split_heads` in plain operations, whose gradient autograd derives: the reference of `RotaryQKV`."""
    B, T, _ = qkv.shape
    if n_heads == n_kv_heads and norms is None:  # q and k rotate together: one set of kernels for both
        heads = qkv.view(B, T, 3, n_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        if rope is None:
            return heads.unbind(0)
        q, k = apply_rope(heads[:2], *rope).unbind(0)
        return q, k, heads[2]
    heads = qkv.view(B, T, n_heads + 2 * n_kv_heads, -1).transpose(1, 2)  # (B, nh + 2 nkv, T, hs)
    q, k, v = heads.split((n_heads, n_kv_heads, n_kv_heads), dim=1)
    if norms is not None:
        q, k = norms[0](q), norms[1](k)
    if rope is None:
        return q, k, v
    return apply_rope(q, *rope), apply_rope(k, *rope), v


class RotaryQKV(torch.autograd.Function):
    """`split_heads` with rope, with a gradient written in place: for eager training.

    With (x1, x2) the two halves of a head's channels and (c, s) the cos and sin of their angles, the
    rotation is (x1 c - x2 s, x2 c + x1 s); its gradient is the inverse rotation of the output's gradient
    g: (g1 c + g2 s, g2 c - g1 s). cos and sin are constants (they get no gradient), the backward pass
    is not itself differentiable, and the outputs are not to be modified in place.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int):
        B, T, _ = qkv.shape
        heads = qkv.view(B, T, n_heads + 2 * n_kv_heads, -1)  # (B, T, nh + 2 nkv, hs)
        half = heads.size(-1) // 2
        c, s = cos[..., :half], sin[..., half:]  # (T, hs/2): both halves share their angles; sin's second is positive
        rotated = []
        for first, count in ((0, n_heads), (n_heads, n_kv_heads)):  # q, then k
            x = heads[:, :, first : first + count].transpose(1, 2)  # (B, n, T, hs): strided
            out = torch.empty(x.shape, dtype=qkv.dtype, device=qkv.device)
            _rotate(x[..., :half], x[..., half:], c, s, out[..., :half], out[..., half:])
            rotated.append(out)
        ctx.save_for_backward(cos, sin)
        ctx.n_heads, ctx.n_kv_heads = n_heads, n_kv_heads
        return rotated[0], rotated[1], heads[:, :, n_heads + n_kv_heads :].transpose(1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor):
        cos, sin = ctx.saved_tensors
        nh, nkv = ctx.n_heads, ctx.n_kv_heads
        B, _, T, hs = grad_q.shape
        half = hs // 2
        c, s = cos[..., :half], sin[..., half:]
        grad = torch.empty((B, T, nh + 2 * nkv, hs), dtype=grad_q.dtype, device=grad_q.device)  # qkv's layout
        for g, first, count in ((grad_q, 0, nh), (grad_k, nh, nkv)):
            dst = grad[:, :, first : first + count].transpose(1, 2)  # (B, n, T, hs) view into grad
            _rotate(g[..., :half], g[..., half:], c, -s, dst[..., :half], dst[..., half:])  # inverse: angle -s
        grad[:, :, nh + nkv :].copy_(grad_v.transpose(1, 2))
        return grad.view(B, T, -1), None, None, None, None


def _rotate(x1, x2, c, s, out1, out2) -> None:
    """out1 = x1 c - x2 s and out2 = x2 c + x1 s, written into out1 and out2 (views of one tensor).

    In c's dtype (float32), rounded once into a lower-precision out, as `apply_rope` does."""
    for out, a, b, sign in ((out1, x1, x2, -1), (out2, x2, x1, 1)):
        if out.dtype == c.dtype:
            torch.mul(a, c, out=out).addcmul_(b, s, value=sign)
        else:
            out.copy_((a * c).addcmul_(b, s, value=sign))
