"""The transformer's layers: norms, causal self-attention with its KV cache, MLPs.

A variant is one class, registered under its name in `gptlit.model.config` (``class SwiGLU(GatedMLP, name="swiglu")``),
and it declares what the rest of gptlit needs to know of it:

- ``row_blocks(config)``: for each linear layer it owns, the row blocks of its weight, each a matrix of its own
  ([q; k; v] of the fused qkv, [gate; up] of a gated MLP's fc). Muon orthogonalizes each block apart
  (`gptlit.training.optim.fused_row_blocks`, which refuses a linear layer without a declaration) and an export writes
  each block as its own matrix (`gptlit.export.architectures`). A layer's fused weights are built from this declaration.
- ``exports``: the transformers model types (`gptlit.export.architectures.ARCHITECTURES`) that have it exactly, and
  ``not_exported``, why there is none, when there is none.

Attention has no name to choose it by yet: its one class, whose options are grouped-query heads and QK-norm,
declares the same (``row_blocks``, and ``exports(config)`` since its options decide).

Nothing here imports Lightning; the model that assembles these is `gptlit.model.gpt.GPT`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from gptlit.model.config import MLPS, NORMS, GPTConfig
from gptlit.model.rope import split_heads

NORM_EPS = 1e-5


class Variant:
    """A base whose subclasses register under a config name: ``class GeGLU(GatedMLP, name="geglu")``.

    The base sets ``registry`` (empty) and ``names`` (the names `gptlit.model.config` allows); a subclass registered
    under a name it does not allow, or one already taken, is refused when its module is imported.

    Attributes:
        exports: The transformers model types (`gptlit.export.architectures.ARCHITECTURES`) that have this layer
            exactly.
        not_exported: Why no transformers architecture has it, when ``exports`` is empty.
    """

    registry: ClassVar[dict[str, type]]
    names: ClassVar[tuple[str, ...]]
    name: ClassVar[str | None] = None
    exports: ClassVar[tuple[str, ...]] = ()
    not_exported: ClassVar[str] = ""

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is None:
            return
        if name not in cls.names or name in cls.registry:
            raise TypeError(
                f"{cls.__name__}: {name!r} is not a free name of {cls.names}; add it in gptlit/model/config.py"
            )
        cls.name = name
        cls.registry[name] = cls

    @classmethod
    def named(cls, name: str) -> type:
        """The class registered under ``name``."""
        if name not in cls.registry:
            raise TypeError(f"no {cls.__name__} class is registered under {name!r} in gptlit/model/layers.py")
        return cls.registry[name]


# Norms ----------------------------------------------------------------------------------------------


class Norm(Variant):
    """A norm variant (``norm_type``) over the residual stream's embed_dim channels."""

    registry: ClassVar[dict[str, type]] = {}
    names = NORMS


class LayerNorm(nn.LayerNorm, Norm, name="layernorm"):
    """LayerNorm, with a bias when ``config.bias``."""

    exports = ("gpt_neox", "gpt2")

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config.embed_dim, eps=NORM_EPS, bias=config.bias)


class RMSNorm(nn.RMSNorm, Norm, name="rmsnorm"):
    """RMSNorm (a gain, no bias)."""

    exports = ("llama", "qwen3")

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config.embed_dim, eps=NORM_EPS)


# Attention ------------------------------------------------------------------------------------------


class KVCache(nn.Module):
    """Keys and values of every position seen so far, preallocated for (batch, max length), n_kv_heads heads.

    The buffers are non-persistent: they never enter a state_dict or a checkpoint.
    """

    def __init__(self, batch_size: int, n_heads: int, max_seq_len: int, head_size: int, device, dtype) -> None:
        super().__init__()
        shape = (batch_size, n_heads, max_seq_len, head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def forward(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hs) at positions input_pos (T,); return the first ``length`` positions of
        the cache (B, nkv, length, hs), all of it by default."""
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k[:, :, :length], self.v[:, :, :length]


class CausalSelfAttention(nn.Module):
    """Causal self-attention; with n_kv_heads < n_heads, each key/value head serves a group of query heads."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = config.n_heads, config.kv_heads
        self.head_size = config.head_size
        self.dropout = config.dropout
        # One matmul for q, k and v; rows are laid out [q; k; v]: n_heads, n_kv_heads and n_kv_heads heads.
        self.qkv = nn.Linear(config.embed_dim, sum(self.row_blocks(config)["qkv"]), bias=config.bias)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim, bias=config.bias)
        # QK-norm: each head's queries and keys RMS-normalized (a gain per channel) before RoPE.
        self.q_norm = nn.RMSNorm(self.head_size, eps=NORM_EPS) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_size, eps=NORM_EPS) if config.qk_norm else None
        self.kv_cache: KVCache | None = None

    @staticmethod
    def row_blocks(config: GPTConfig) -> dict[str, tuple[int, ...]]:
        """The rows of qkv's weight are three matrices, [q; k; v]; proj's one."""
        q, kv = config.n_heads * config.head_size, config.kv_heads * config.head_size
        return {"qkv": (q, kv, kv), "proj": (config.embed_dim,)}

    @staticmethod
    def exports(config: GPTConfig) -> tuple[str, ...]:
        """The transformers model types with this attention exactly: grouped-query heads are Llama's and Qwen3's
        only, QK-norm Qwen3's only."""
        if config.qk_norm:
            return ("qwen3",)
        return ("gpt_neox", "gpt2", "llama") if config.kv_heads == config.n_heads else ("llama",)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache_len: int | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        norms = (self.q_norm, self.k_norm) if self.q_norm is not None else None
        q, k, v = split_heads(
            self.qkv(x), self.n_heads, self.n_kv_heads, rope, norms
        )  # q (B, nh, T, hs), k, v (B, nkv, T, hs)
        grouped = self.n_kv_heads != self.n_heads
        if input_pos is None:
            # Training and uncached inference: plain causal attention over these T tokens.
            dropout_p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=grouped)
        else:
            if self.kv_cache is None:
                raise RuntimeError("forward with input_pos needs a KV cache: call model.set_kv_cache(batch_size)")
            k, v = self.kv_cache(input_pos, k, v, cache_len)  # (B, nkv, L, hs)
            # mask (T, L) is True where a query may attend: positions not yet written are never seen.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=grouped)  # (B, nh, T, hs)

        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return F.dropout(self.proj(y), self.dropout, self.training)  # (B, T, C)


# MLPs -----------------------------------------------------------------------------------------------


class MLP(nn.Module, Variant):
    """proj(activation(fc(x))): an MLP variant (``mlp``) is a subclass with its activation, registered by name.

    Attributes:
        fc_blocks: fc's rows are this many blocks of hidden_size rows, each a matrix of its own (2: a gated
            MLP's [gate; up]); fc is built this wide.
        hf_act: The activation's name in the configs of the architectures it ``exports`` to.
    """

    registry: ClassVar[dict[str, type]] = {}
    names = tuple(MLPS)
    fc_blocks: ClassVar[int] = 1
    hf_act: ClassVar[str] = ""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.embed_dim, sum(self.row_blocks(config)["fc"]), bias=config.bias)
        self.proj = nn.Linear(config.hidden_size, config.embed_dim, bias=config.bias)
        self.dropout = config.dropout

    @classmethod
    def row_blocks(cls, config: GPTConfig) -> dict[str, tuple[int, ...]]:
        """fc's rows are fc_blocks matrices of hidden_size rows; proj's one matrix."""
        return {"fc": (config.hidden_size,) * cls.fc_blocks, "proj": (config.embed_dim,)}

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        """(..., fc_blocks * H) -> (..., H)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.proj(self.activation(self.fc(x))), self.dropout, self.training)  # (B, T, C)


class GeluMLP(MLP, name="gelu"):
    """GPT-2's MLP, with the exact GELU (GPT-2's own is its tanh approximation)."""

    exports, hf_act = ("gpt_neox", "gpt2"), "gelu"

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        return F.gelu(h)


class Relu2MLP(MLP, name="relu2"):
    """Squared ReLU (Primer)."""

    exports, hf_act = ("gpt_neox", "gpt2"), "relu2"

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        return F.relu(h).square()


class GatedMLP(MLP):
    """gate(g) * u: fc computes g and u in one matmul, its rows [gate; up], each hidden_size wide."""

    fc_blocks = 2

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)  # (..., 2H) -> 2 x (..., H)
        return self.gate(gate) * up

    def gate(self, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class SwiGLU(GatedMLP, name="swiglu"):
    """SiLU-gated (Llama, Qwen3)."""

    exports, hf_act = ("llama", "qwen3"), "silu"

    def gate(self, g: torch.Tensor) -> torch.Tensor:
        return F.silu(g)


class GeGLU(GatedMLP, name="geglu"):
    """GELU-gated (Shazeer, 2020), with the exact GELU."""

    not_exported = (
        "Gemma's GELU-gated MLP is the tanh approximation of GELU, and Gemma scales its embeddings by "
        "sqrt(embed_dim) and its RMSNorm by 1 + gain"
    )

    def gate(self, g: torch.Tensor) -> torch.Tensor:
        return F.gelu(g)
