"""Weight and config mapping between gptlit's GPT and Hugging Face's GPTNeoXForCausalLM.

A RoPE + LayerNorm gptlit model is a GPT-NeoX with rotary on every channel (``partial_rotary_factor=1``),
sequential residuals (``use_parallel_residual=False``) and tied embeddings. The one real difference is
the fused QKV layout: gptlit stacks [q; k; v] (each embed_dim rows), GPT-NeoX interleaves per head
[q_h; k_h; v_h] (each head_size rows). No transformers import is needed here.
"""

from __future__ import annotations

import torch

from gptlit.config import GPTConfig
from gptlit.errors import UsageError


def check_neox_compatible(config: GPTConfig) -> None:
    """Raise UsageError (a ValueError) naming the option when a config has no faithful GPT-NeoX equivalent."""
    if not config.use_rope:
        raise UsageError("use_rope=False (learned positions) has no GPT-NeoX equivalent; cannot convert")
    if config.norm_type != "layernorm":
        raise UsageError(f"norm_type={config.norm_type!r} has no GPT-NeoX equivalent (needs 'layernorm')")
    if not config.bias:
        raise UsageError("bias=False has no GPT-NeoX equivalent (its LayerNorms always have a bias)")


def neox_config_dict(config: GPTConfig, bos_id: int = 1, eos_id: int = 2, pad_id: int = 0) -> dict:
    """The ``config.json`` fields of the equivalent ``GPTNeoXConfig``."""
    check_neox_compatible(config)
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": config.vocab_size,
        "hidden_size": config.embed_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "intermediate_size": 4 * config.embed_dim,
        "hidden_act": "gelu",
        "max_position_embeddings": config.block_size,
        "layer_norm_eps": 1e-5,
        "use_parallel_residual": False,
        "tie_word_embeddings": True,
        "attention_bias": True,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        # Both spellings: transformers 5 reads rope_parameters, 4.x reads rotary_pct / rotary_emb_base.
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": config.rope_base,
            "partial_rotary_factor": 1.0,
        },
        "rotary_pct": 1.0,
        "rotary_emb_base": config.rope_base,
        "rope_theta": config.rope_base,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
    }


def _qkv_to_neox(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # (3·C, ...) laid out (3, nh, hs, ...) -> (nh, 3, hs, ...)
    rest = w.shape[1:]
    return w.reshape(3, n_heads, -1, *rest).transpose(0, 1).reshape(-1, *rest)


def _qkv_from_neox(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # (3·C, ...) laid out (nh, 3, hs, ...) -> (3, nh, hs, ...)
    rest = w.shape[1:]
    return w.reshape(n_heads, 3, -1, *rest).transpose(0, 1).reshape(-1, *rest)


# gptlit name inside a block -> GPT-NeoX name inside a layer (weight and bias alike).
_BLOCK_NAMES = {
    "norm_1": "input_layernorm",
    "attn.qkv": "attention.query_key_value",
    "attn.proj": "attention.dense",
    "norm_2": "post_attention_layernorm",
    "mlp.fc": "mlp.dense_h_to_4h",
    "mlp.proj": "mlp.dense_4h_to_h",
}


def _name_pairs(config: GPTConfig):
    """(gptlit name, GPT-NeoX name) of every weight both models store (the tied head aside)."""
    yield "wte.weight", "gpt_neox.embed_in.weight"
    yield "norm_f.weight", "gpt_neox.final_layer_norm.weight"
    yield "norm_f.bias", "gpt_neox.final_layer_norm.bias"
    for i in range(config.n_layers):
        for ours, theirs in _BLOCK_NAMES.items():
            for kind in ("weight", "bias"):
                yield f"blocks.{i}.{ours}.{kind}", f"gpt_neox.layers.{i}.{theirs}.{kind}"


def to_neox_state_dict(state_dict: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """gptlit GPT state_dict -> GPTNeoXForCausalLM state_dict.

    The output head is left out: it is tied to ``gpt_neox.embed_in`` (``tie_word_embeddings``), and its
    own name differs between transformers releases (``embed_out`` in 4.x, ``lm_head`` in 5.x).
    """
    check_neox_compatible(config)
    out = {}
    for ours, theirs in _name_pairs(config):
        tensor = state_dict[ours]
        if ".attn.qkv." in ours:
            tensor = _qkv_to_neox(tensor, config.n_heads)
        out[theirs] = tensor.detach().clone().contiguous()
    return out


def from_neox_state_dict(state_dict: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """GPTNeoXForCausalLM state_dict -> gptlit GPT state_dict (inverse of :func:`to_neox_state_dict`)."""
    check_neox_compatible(config)
    out = {}
    for ours, theirs in _name_pairs(config):
        tensor = state_dict[theirs]
        if ".attn.qkv." in ours:
            tensor = _qkv_from_neox(tensor, config.n_heads)
        out[ours] = tensor.detach().clone()
    out["lm_head.weight"] = out["wte.weight"]
    return out
