"""Rotary position embeddings, and the eager training path of the qkv split (gptlit.rope.RotaryQKV)."""

from __future__ import annotations

import pytest
import torch

from gptlit.rope import RotaryQKV, apply_rope, build_rope_cache, split_heads


def test_apply_rope_is_a_rotation_of_relative_position():
    # q·k after RoPE depends on the distance between the positions only, and norms are preserved.
    torch.manual_seed(0)
    cos, sin = build_rope_cache(16, 8)
    q, k = torch.randn(8), torch.randn(8)

    def rotated(x, pos):
        return apply_rope(x.view(1, 1, 1, 8), cos[pos : pos + 1], sin[pos : pos + 1]).view(8)

    torch.testing.assert_close(rotated(q, 5).norm(), q.norm())
    torch.testing.assert_close(rotated(q, 7) @ rotated(k, 4), rotated(q, 12) @ rotated(k, 9))
    assert not torch.allclose(rotated(q, 7) @ rotated(k, 4), rotated(q, 7) @ rotated(k, 5))


def plain_split(qkv: torch.Tensor, n_heads: int, rope) -> tuple[torch.Tensor, ...]:
    """split_heads as inference runs it (the plain path), whether or not qkv requires grad."""
    with torch.enable_grad():
        B, T, _ = qkv.shape
        heads = qkv.view(B, T, 3, n_heads, -1).permute(2, 0, 3, 1, 4)
        return (*apply_rope(heads[:2], *rope).unbind(0), heads[2])


@pytest.mark.parametrize(("B", "T", "n_heads", "hs"), [(2, 7, 4, 8), (1, 1, 1, 16), (3, 16, 2, 4)])
def test_rotary_qkv_matches_the_plain_split_and_its_gradient(B, T, n_heads, hs):
    torch.manual_seed(T)
    qkv = torch.randn(B, T, 3 * n_heads * hs, requires_grad=True)
    cos, sin = (t[3 : 3 + T] for t in build_rope_cache(T + 3, hs))  # positions 3.. as a window would have
    upstream = [torch.randn(B, n_heads, T, hs) for _ in range(3)]

    def outputs_and_grad(split) -> tuple[list[torch.Tensor], torch.Tensor]:
        qkv.grad = None
        outs = split(qkv, n_heads, (cos, sin))
        sum((o * g).sum() for o, g in zip(outs, upstream, strict=True)).backward()
        return [o.detach() for o in outs], qkv.grad

    fast, fast_grad = outputs_and_grad(lambda x, n, rope: RotaryQKV.apply(x, *rope, n))
    plain, plain_grad = outputs_and_grad(plain_split)
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast_grad, plain_grad, rtol=1e-6, atol=1e-6)


def test_rotary_qkv_under_bf16_autocast_stays_close_to_float32():
    torch.manual_seed(0)
    qkv = torch.randn(2, 8, 3 * 4 * 16, requires_grad=True)
    rope = build_rope_cache(8, 16)
    expected = plain_split(qkv, 4, rope)
    low = qkv.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = RotaryQKV.apply(low, *rope, 4)
    sum(o.float().sum() for o in actual).backward()
    for a, b in zip(actual, expected, strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.detach(), rtol=2e-2, atol=2e-2)
    assert low.grad.dtype == torch.bfloat16


def test_split_heads_takes_the_fast_path_only_in_eager_training(monkeypatch):
    qkv = torch.randn(1, 4, 3 * 2 * 8)
    rope = build_rope_cache(4, 8)
    calls, apply = [], RotaryQKV.apply
    monkeypatch.setattr(RotaryQKV, "apply", lambda *args: calls.append(1) or apply(*args))
    split_heads(qkv, 2, rope)  # inference
    split_heads(qkv.requires_grad_(), 2, None)  # no rotation: a plain split
    assert calls == []
    split_heads(qkv, 2, rope)
    assert calls == [1]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # Inductor fuses the plain path instead
    split_heads(qkv, 2, rope)
    assert calls == [1]
