"""The forward pass of decoding over the KV cache: `GPT.forward(idx, input_pos, cache_len)`, the same operations
without the Python of module calls, and its matrix products in the form the CPU runs fastest.

At batch 1 a decoding pass is short: the tiny model's matmuls read 17 MB of weights in some 0.4 ms, and eager PyTorch
adds as much again in Python (a module call per layer, a dictionary look-up per parameter, dropout calls that do
nothing in eval mode). `CachedPass` looks the tensors and functions up once, when a decoding starts, and then runs the
operations of `GPT.forward`, in its order, on them: each layer's own functions (the norm's ``forward``, the MLP's
``activation``, the attention's `split_and_rotate`), the linear layers' weights. `GPT.forward` is the reference:
tests/test_cached_pass.py holds the two equal, bit for bit, for every variant, when the products are the model's own
``F.linear`` (``products="linear"``). By default a float32 model on a CPU multiplies in the form its CPU runs
fastest for the pass's rows (`gptlit.model.products`: on a 2-core AMD EPYC a pass of one token took 28% less time,
of nine tokens 10% less), and the logits equal `GPT.forward`'s up to rounding. Eval mode only (no dropout).

A float32 model on an x86-64 CPU runs its pass with oneDNN off: oneDNN's element-wise kernels (GELU's) cost some
20 µs a call on a decoding pass's few values, where PyTorch's own take 2. The two GELUs differ in the last bit of some
values, so the logits then equal those of `GPT.forward` run with oneDNN off (``torch.backends.mkldnn.enabled``).
The setting is the process's: another thread's float32 operations during a pass run without oneDNN too (the same
results up to rounding), and it is set back when the pass ends, however it ends.
"""

from __future__ import annotations

import platform
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from gptlit.model.products import Products
from gptlit.model.rope import split_and_rotate

if TYPE_CHECKING:
    from gptlit.model.gpt import GPT, Block


class CachedPass:
    """`GPT.forward` with ``input_pos`` and ``cache_len``, for a model in eval mode with a KV cache, made after
    `GPT.set_kv_cache` (it holds that cache's tensors): ``CachedPass(model)(idx, input_pos, cache_len)``.

    ``products`` is the form of the linear layers' products (`gptlit.model.products`): ``"fastest"``, the form a
    float32 model's CPU runs fastest for the pass's row count (the logits then equal `GPT.forward`'s up to rounding),
    or one form for all: ``"linear"`` is `GPT.forward`'s own, bit for bit.
    """

    def __init__(self, model: GPT, products: str = "fastest") -> None:
        if model.training or model.causal_mask is None:
            raise RuntimeError("CachedPass needs a model in eval mode with a KV cache (model.set_kv_cache)")
        linears = [m for b in model.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.fc, b.mlp.proj)] + [model.lm_head]
        products = Products([(m.weight, m.bias) for m in linears], products)
        self.wte = model.wte.weight  # (V, C)
        self.wpe = None if model.wpe is None else model.wpe.weight  # (block_size, C)
        self.rope = (model.rope_cos, model.rope_sin) if model.config.use_rope else None  # 2 x (block_size, hs)
        self.causal_mask = model.causal_mask  # (L, L)
        self.blocks = [_CachedBlock(block, products, 4 * i) for i, block in enumerate(model.blocks)]
        self.norm_f = model.norm_f.forward
        self.head = products.layer(len(linears) - 1)  # (B, T, C) -> (B, T, V)
        # Measured on x86-64 CPUs; elsewhere (aarch64 builds may route matmuls through oneDNN) it stays as set.
        on_x86_cpu = self.wte.device.type == "cpu" and platform.machine().lower() in ("x86_64", "amd64")
        self.without_onednn = on_x86_cpu and self.wte.dtype == torch.float32

    def __call__(self, idx: torch.Tensor, input_pos: torch.Tensor, cache_len: int) -> torch.Tensor:
        """Logits (B, T, V) of tokens idx (B, T) at the cache's last positions, input_pos (T,): cache_len - T ..
        cache_len - 1."""
        if not self.without_onednn:
            return self.forward(idx, input_pos, cache_len)
        onednn = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False
        try:
            return self.forward(idx, input_pos, cache_len)
        finally:
            torch.backends.mkldnn.enabled = onednn

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor, cache_len: int) -> torch.Tensor:
        """The pass itself, with oneDNN as it is set."""
        T = idx.size(1)
        pos = slice(cache_len - T, cache_len)
        x = F.embedding(idx, self.wte)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe[pos]
        rope = None if self.rope is None else (self.rope[0][pos], self.rope[1][pos])  # 2 x (T, hs)
        mask = None if T == 1 else self.causal_mask[pos, :cache_len]  # (T, cache_len); one token sees every position
        for block in self.blocks:
            x = block(x, rope, input_pos, mask, cache_len)
        return self.head(self.norm_f(x))  # (B, T, V)


class _CachedBlock:
    """A `Block`'s pass over the cache: x + attn(norm_1(x)), then x + mlp(norm_2(x))."""

    def __init__(self, block: Block, products: Products, first: int) -> None:
        attn, mlp = block.attn, block.mlp
        self.norm_1, self.norm_2 = block.norm_1.forward, block.norm_2.forward
        # The block's linear layers, products.layer(first) .. products.layer(first + 3): x (B, T, K) -> (B, T, N)
        self.qkv, self.proj, self.fc, self.mlp_proj = (products.layer(first + i) for i in range(4))
        self.n_heads, self.n_kv_heads = attn.n_heads, attn.n_kv_heads
        self.grouped = attn.n_kv_heads != attn.n_heads
        self.qk_norms = (attn.q_norm, attn.k_norm) if attn.q_norm is not None else None
        self.k, self.v = attn.kv_cache.k, attn.kv_cache.v  # (B, nkv, L, hs)
        self.activation = mlp.activation

    def __call__(self, x, rope, input_pos, mask, cache_len) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(self.norm_1(x))  # (B, T, (nh + 2 nkv) hs)
        q, k, v = split_and_rotate(qkv, self.n_heads, self.n_kv_heads, rope, self.qk_norms)
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        k, v = self.k[:, :, :cache_len], self.v[:, :, :cache_len]  # (B, nkv, cache_len, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.grouped)  # (B, nh, T, hs)
        x = x + self.proj(y.transpose(1, 2).contiguous().view(B, T, C))
        h = self.fc(self.norm_2(x))  # (B, T, fc_blocks * H)
        return x + self.mlp_proj(self.activation(h))  # (B, T, C)
