"""The model's hyperparameters, in one small dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from gptlit.errors import ConfigError

NormType = Literal["layernorm", "rmsnorm"]


@dataclass
class GPTConfig:
    """Shape of a GPT.

    Args:
        vocab_size: Number of token ids the model reads and predicts.
        block_size: Longest sequence the model is trained on (its context length).
        embed_dim: Width of the residual stream.
        n_heads: Attention heads per layer; ``embed_dim`` must divide evenly among them.
        n_layers: Transformer blocks.
        dropout: Dropout on attention weights and residual branches during training.
        use_rope: Rotary position embeddings when True, learned absolute positions when False.
        norm_type: ``"layernorm"`` or ``"rmsnorm"``.
        bias: Biases in linear layers and LayerNorm.
        rope_base: Base of the RoPE frequencies.
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

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "embed_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.embed_dim % self.n_heads:
            raise ConfigError(f"GPTConfig.embed_dim ({self.embed_dim}) must be divisible by n_heads ({self.n_heads})")
        if self.use_rope and self.head_size % 2:
            raise ConfigError(
                f"GPTConfig: RoPE needs an even head size, got embed_dim/n_heads = {self.head_size}; "
                "change embed_dim or n_heads, or set use_rope=False"
            )
        if self.norm_type not in ("layernorm", "rmsnorm"):
            raise ConfigError(f"GPTConfig.norm_type must be 'layernorm' or 'rmsnorm', got {self.norm_type!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.rope_base <= 0:
            raise ConfigError(f"GPTConfig.rope_base must be positive, got {self.rope_base}")

    @property
    def head_size(self) -> int:
        return self.embed_dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)
