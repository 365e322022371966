"""The model's shape, in one small dataclass: every model option is declared here, once.

`GPTLitModule` takes a `GPTConfig` (``model.config`` in YAML and on the command line), and a checkpoint
carries it. The names of the norm and MLP variants are listed here, once: each is one class in
`gptlit/model/layers.py` registered under its name, which declares what the optimizer and the export need of it.
This module imports no torch, so that reading a config (and ``import gptlit``) stays light.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

from gptlit.errors import ConfigError

# A gated MLP's default hidden width, 8/3 of embed_dim, is rounded up to a multiple of this (as llama2.c does).
GATED_MULTIPLE = 32


def ungated_hidden(embed_dim: int) -> int:
    """4 x embed_dim: GPT-2's MLP width."""
    return 4 * embed_dim


def gated_hidden(embed_dim: int) -> int:
    """8/3 x embed_dim rounded up to a multiple of 32: a gated MLP's three matrices hold as many parameters as
    an ungated MLP's two of 4 x embed_dim."""
    return GATED_MULTIPLE * math.ceil(8 * embed_dim / 3 / GATED_MULTIPLE)


# The variants by their config names. Each name is one class in gptlit/model/layers.py registered under it (a class
# registered under a name missing here fails at import; tests/test_layers.py checks every name has its class).
NORMS = ("layernorm", "rmsnorm")
# Each MLP's name and its default hidden width (mlp_hidden null), a function of embed_dim.
MLPS = {"gelu": ungated_hidden, "swiglu": gated_hidden, "relu2": ungated_hidden, "geglu": gated_hidden}
NormType = Literal[NORMS]  # the choices that --help lists and the parser checks
MLPType = Literal[tuple(MLPS)]


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT.

    Args:
        vocab_size: Number of token ids the model reads and predicts (linked from data.vocab_size by the CLI).
        block_size: Longest sequence the model is trained on (its context length).
        embed_dim: Width of the residual stream.
        n_heads: Query heads per layer; embed_dim must divide evenly among them.
        n_layers: Transformer blocks.
        dropout: Dropout on attention weights and residual branches during training.
        use_rope: Rotary position embeddings when true, learned absolute positions when false.
        norm_type: ``layernorm`` or ``rmsnorm``.
        bias: Biases in the linear layers and LayerNorms.
        rope_base: Base of the RoPE frequencies.
        mlp: ``gelu`` (GPT-2), ``swiglu`` (gated SiLU, Llama), ``relu2`` (squared ReLU) or ``geglu`` (gated
            exact GELU; no transformers architecture is exactly it, so it does not export).
        mlp_hidden: Hidden width of the MLP; null: 4 * embed_dim for gelu and relu2, and for the gated swiglu and
            geglu 8/3 * embed_dim rounded up to a multiple of 32 (the same parameter count as 4 * embed_dim ungated).
        n_kv_heads: Key/value heads, shared by groups of query heads (grouped-query attention; 1 is multi-query);
            null: n_heads. The KV cache holds n_kv_heads heads.
        qk_norm: RMSNorm of each head's queries and keys before RoPE (Qwen3).
        tie_embeddings: One matrix embeds tokens and predicts them (true), or the head has its own (false).
    """

    vocab_size: int = 8000
    block_size: int = 256
    embed_dim: int = 512
    n_heads: int = 8
    n_layers: int = 6
    dropout: float = 0.1
    use_rope: bool = True
    norm_type: NormType = "layernorm"
    bias: bool = True
    rope_base: float = 10000.0
    mlp: MLPType = "gelu"
    mlp_hidden: int | None = None
    n_kv_heads: int | None = None
    qk_norm: bool = False
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "embed_dim", "n_heads", "n_layers", "mlp_hidden", "n_kv_heads"):
            value = getattr(self, name)
            if value is None and name in ("mlp_hidden", "n_kv_heads"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.embed_dim % self.n_heads:
            raise ConfigError(f"GPTConfig.embed_dim ({self.embed_dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"GPTConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}): "
                "each key/value head serves a group of query heads"
            )
        if self.use_rope and self.head_size % 2:
            raise ConfigError(
                f"GPTConfig: RoPE needs an even head size, got embed_dim/n_heads = {self.head_size}; "
                "change embed_dim or n_heads, or set use_rope=False"
            )
        for name, allowed in (("norm_type", NORMS), ("mlp", tuple(MLPS))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"GPTConfig.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.rope_base <= 0:
            raise ConfigError(f"GPTConfig.rope_base must be positive, got {self.rope_base}")

    @property
    def head_size(self) -> int:
        return self.embed_dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_heads, or n_heads when it is null."""
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_size(self) -> int:
        """The MLP's hidden width (see ``mlp_hidden``)."""
        return self.mlp_hidden if self.mlp_hidden is not None else MLPS[self.mlp](self.embed_dim)

    def to_dict(self) -> dict:
        return asdict(self)
