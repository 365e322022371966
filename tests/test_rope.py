"""Rotary position embeddings, and the eager training path of the qkv split (gptlit.model.rope.RotaryQKV)."""

from __future__ import annotations

import pytest
import torch

from gptlit.model.rope import RotaryQKV, apply_rope, build_rope_cache, split_and_rotate, split_heads


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


@pytest.mark.parametrize(
    ("B", "T", "n_heads", "n_kv_heads", "hs"),
    [(2, 7, 4, 4, 8), (1, 1, 1, 1, 16), (3, 16, 2, 2, 4), (2, 7, 4, 2, 8), (2, 5, 4, 1, 8)],
    ids=["mha", "one-head", "short-heads", "gqa", "mqa"],
)
def test_rotary_qkv_matches_the_split_and_rotate_and_its_gradient(B, T, n_heads, n_kv_heads, hs):
    torch.manual_seed(T)
    qkv = torch.randn(B, T, (n_heads + 2 * n_kv_heads) * hs, requires_grad=True)
    cos, sin = (t[3 : 3 + T] for t in build_rope_cache(T + 3, hs))  # positions 3.. as a window would have
    upstream = [torch.randn(B, n, T, hs) for n in (n_heads, n_kv_heads, n_kv_heads)]

    def outputs_and_grad(split) -> tuple[list[torch.Tensor], torch.Tensor]:
        qkv.grad = None
        outs = split(qkv, n_heads, n_kv_heads, (cos, sin))
        sum((o * g).sum() for o, g in zip(outs, upstream, strict=True)).backward()
        return [o.detach() for o in outs], qkv.grad

    fast, fast_grad = outputs_and_grad(lambda x, nh, nkv, rope: RotaryQKV.apply(x, *rope, nh, nkv))
    plain, plain_grad = outputs_and_grad(split_and_rotate)
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast_grad, plain_grad, rtol=1e-6, atol=1e-6)


def test_rotary_qkv_under_bf16_autocast_matches_the_split_and_rotate():
    # As in bf16-mixed training: the projection runs under autocast and gives bf16 q, k and v.
    torch.manual_seed(0)
    linear, x = torch.nn.Linear(32, 3 * 4 * 8), torch.randn(2, 8, 32)
    rope = build_rope_cache(8, 8)
    upstream = [torch.randn(2, 4, 8, 8) for _ in range(3)]

    def outputs_and_grad(split, bf16: bool = True) -> tuple[list[torch.Tensor], torch.Tensor]:
        linear.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outs = split(linear(x), 4, 4, rope)
        sum((o.float() * g).sum() for o, g in zip(outs, upstream, strict=True)).backward()
        return [o.detach() for o in outs], linear.weight.grad.clone()

    fast, fast_grad = outputs_and_grad(lambda x, nh, nkv, rope: RotaryQKV.apply(x, *rope, nh, nkv))
    plain, plain_grad = outputs_and_grad(split_and_rotate)
    for a, b in zip(fast, plain, strict=True):
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(a, b)  # rotated in float32 and rounded once, as the plain path does
    # The gradients round differently (the plain chain rounds each term to bf16 before adding them):
    # both against float32, the fast path no less accurate.
    _, exact_grad = outputs_and_grad(split_and_rotate, bf16=False)
    fast_error, plain_error = ((g - exact_grad).norm() / exact_grad.norm() for g in (fast_grad, plain_grad))
    assert fast_error < 5e-3 and fast_error <= 1.1 * plain_error


def test_split_heads_takes_the_fast_path_only_in_eager_training(monkeypatch):
    qkv = torch.randn(1, 4, 3 * 2 * 8)
    rope = build_rope_cache(4, 8)
    calls, apply = [], RotaryQKV.apply
    monkeypatch.setattr(RotaryQKV, "apply", lambda *args: calls.append(1) or apply(*args))
    split_heads(qkv, 2, 2, rope)  # inference
    split_heads(qkv.requires_grad_(), 2, 2, None)  # no rotation: a plain split
    norms = (torch.nn.RMSNorm(8), torch.nn.RMSNorm(8))
    split_heads(qkv, 2, 2, rope, norms)  # QK-norm comes before the rotation: the plain path
    assert calls == []
    split_heads(qkv, 2, 2, rope)
    assert calls == [1]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # Inductor fuses the plain path instead
    split_heads(qkv, 2, 2, rope)
    assert calls == [1]
