"""gptlit's GPT as the transformers architecture that is exactly it: configs and weights, both ways.

| gptlit variant                                                         | transformers          |
| RoPE, LayerNorm, gelu or relu2 MLP, n_kv_heads = n_heads, no qk_norm    | GPTNeoXForCausalLM    |
| learned positions, LayerNorm, gelu or relu2, n_kv_heads = n_heads, ...  | GPT2LMHeadModel       |
| RoPE, RMSNorm, swiglu, any n_kv_heads, no qk_norm                       | LlamaForCausalLM      |
| RoPE, RMSNorm, swiglu, any n_kv_heads, qk_norm, bias=false              | Qwen3ForCausalLM      |

Tied or untied head, with or without biases (a bias the transformers model has and gptlit lacks is exported
as zeros: the same function). gptlit's rotary layout (rotate-half) is theirs. The differences are layouts:
gptlit fuses [q; k; v] and [gate; up] into one matrix each, GPT-NeoX interleaves q, k, v per head, GPT-2
stores its linear weights transposed (Conv1D). No transformers import is needed here.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gptlit.errors import UsageError
from gptlit.model.config import GPTConfig
from gptlit.model.layers import MLP, CausalSelfAttention, Norm

EXPORTABLE = (
    "RoPE + LayerNorm + gelu/relu2 MLP + n_kv_heads = n_heads (GPT-NeoX); learned positions + LayerNorm + "
    "gelu/relu2 + n_kv_heads = n_heads (GPT-2); RoPE + RMSNorm + swiglu (Llama), with qk_norm and bias false (Qwen3)"
)
ARCHITECTURES = {
    "gpt_neox": "GPTNeoXForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def hf_model_type(config: GPTConfig) -> str:
    """The transformers ``model_type`` that is exactly ``config``: the one that each part of the model (its
    norm, attention and MLP, as `gptlit.model.layers` declares them; positions; biases) exports to. UsageError
    naming what exports otherwise, and why a part exports nowhere when its class says."""
    c = config
    norm, mlp = Norm.named(c.norm_type), MLP.named(c.mlp)
    parts = (
        ("gpt2",) if not c.use_rope else ("gpt_neox", "llama", "qwen3"),  # GPT-2 alone has learned positions
        ("gpt_neox", "gpt2", "llama") if c.bias else tuple(ARCHITECTURES),  # Qwen3's MLP has no biases
        norm.exports,
        CausalSelfAttention.exports(c),
        mlp.exports,
    )
    for model_type in ARCHITECTURES:
        if all(model_type in exports for exports in parts):
            return model_type
    variant = (
        f"use_rope={c.use_rope}, norm_type={c.norm_type}, mlp={c.mlp}, n_kv_heads={c.n_kv_heads}, "
        f"qk_norm={c.qk_norm}, bias={c.bias}"
    )
    why = f"mlp {c.mlp}: {mlp.not_exported}; " if mlp.not_exported else ""
    raise UsageError(f"no transformers architecture is exactly this model ({variant}); {why}these export: {EXPORTABLE}")


def hf_config_dict(config: GPTConfig, bos_id: int = 1, eos_id: int = 2, pad_id: int = 0) -> dict:
    """The ``config.json`` of the transformers model that is exactly ``config``."""
    model_type = hf_model_type(config)
    c, mlp_act = config, MLP.named(config.mlp).hf_act
    common = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
    }
    if model_type == "gpt2":
        return {**common, **_gpt2_config(c)}
    # Both spellings of the rotary settings: transformers 5 reads rope_parameters, 4.x the others.
    rope = {"rope_parameters": {"rope_type": "default", "rope_theta": c.rope_base}, "rope_theta": c.rope_base}
    shape = {
        "hidden_size": c.embed_dim,
        "intermediate_size": c.hidden_size,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "max_position_embeddings": c.block_size,
        "attention_dropout": 0.0,
    }
    if model_type == "gpt_neox":
        neox = {"hidden_act": mlp_act, "layer_norm_eps": 1e-5, "use_parallel_residual": False, "hidden_dropout": 0.0}
        return {**common, **shape, **rope, **neox, "attention_bias": c.bias, "rotary_pct": 1.0,
                "rotary_emb_base": c.rope_base}  # fmt: skip
    llama = {
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_size,
        "hidden_act": mlp_act,
        "rms_norm_eps": 1e-5,
        "attention_bias": c.bias,
    }
    if model_type == "llama":
        return {**common, **shape, **rope, **llama, "mlp_bias": c.bias}
    layers = {
        "use_sliding_window": False,
        "max_window_layers": c.n_layers,
        "layer_types": ["full_attention"] * c.n_layers,
    }
    return {**common, **shape, **rope, **llama, **layers}


def _gpt2_config(c: GPTConfig) -> dict:
    return {
        "n_positions": c.block_size,
        "n_embd": c.embed_dim,
        "n_layer": c.n_layers,
        "n_head": c.n_heads,
        "n_inner": c.hidden_size,
        "activation_function": MLP.named(c.mlp).hf_act,  # "gelu": the exact GELU, not GPT-2's tanh approximation
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
    }


@dataclass(frozen=True)
class Link:
    """One tensor of the transformers model, and where it is in gptlit's."""

    theirs: str
    ours: str | None  # None: gptlit has no such parameter, and the function is the same with zeros
    rows: tuple[int, int] | None = None  # a block of rows of ours: q, k or v of the fused qkv; gate or up of fc
    transpose: bool = False  # GPT-2's Conv1D stores (in, out)
    neox_heads: int | None = None  # GPT-NeoX interleaves q, k and v per head
    zeros: tuple[int, ...] = ()  # the shape of the zeros, when ours is None


def links(config: GPTConfig) -> list[Link]:
    """Every tensor of the transformers model that is exactly ``config``, in terms of gptlit's state_dict."""
    model_type = hf_model_type(config)
    found = {"gpt_neox": _neox_links, "gpt2": _gpt2_links, "llama": _llama_links, "qwen3": _llama_links}
    return list(found[model_type](config))


def _neox_links(c: GPTConfig) -> Iterator[Link]:
    biases = ("weight", "bias") if c.bias else ("weight",)
    yield Link("gpt_neox.embed_in.weight", "wte.weight")
    yield from _norm_links("gpt_neox.final_layer_norm", "norm_f", c)
    for i in range(c.n_layers):
        ours, theirs = f"blocks.{i}", f"gpt_neox.layers.{i}"
        yield from _norm_links(f"{theirs}.input_layernorm", f"{ours}.norm_1", c)
        yield from _norm_links(f"{theirs}.post_attention_layernorm", f"{ours}.norm_2", c)
        for kind in biases:  # attention_bias follows bias; the MLP always has biases
            qkv = f"{theirs}.attention.query_key_value.{kind}"
            yield Link(qkv, f"{ours}.attn.qkv.{kind}", neox_heads=c.n_heads)
            yield Link(f"{theirs}.attention.dense.{kind}", f"{ours}.attn.proj.{kind}")
        for name, layer, width in (("dense_h_to_4h", "fc", c.hidden_size), ("dense_4h_to_h", "proj", c.embed_dim)):
            yield Link(f"{theirs}.mlp.{name}.weight", f"{ours}.mlp.{layer}.weight")
            yield _bias_link(f"{theirs}.mlp.{name}.bias", f"{ours}.mlp.{layer}.bias", width, c)
    if not c.tie_embeddings:  # "embed_out" in transformers 4, which transformers 5 reads as "lm_head"
        yield Link("embed_out.weight", "lm_head.weight")


def _gpt2_links(c: GPTConfig) -> Iterator[Link]:
    yield Link("transformer.wte.weight", "wte.weight")
    yield Link("transformer.wpe.weight", "wpe.weight")
    yield from _norm_links("transformer.ln_f", "norm_f", c)
    widths = {"attn.c_attn": 3 * c.embed_dim, "attn.c_proj": c.embed_dim, "mlp.c_fc": c.hidden_size}
    layers = {"attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}
    for i in range(c.n_layers):
        ours, theirs = f"blocks.{i}", f"transformer.h.{i}"
        yield from _norm_links(f"{theirs}.ln_1", f"{ours}.norm_1", c)
        yield from _norm_links(f"{theirs}.ln_2", f"{ours}.norm_2", c)
        for name, layer in layers.items():
            yield Link(f"{theirs}.{name}.weight", f"{ours}.{layer}.weight", transpose=True)
            yield _bias_link(f"{theirs}.{name}.bias", f"{ours}.{layer}.bias", widths.get(name, c.embed_dim), c)
    if not c.tie_embeddings:
        yield Link("lm_head.weight", "lm_head.weight")


def _llama_links(c: GPTConfig) -> Iterator[Link]:
    q, k, v = row_ranges(CausalSelfAttention.row_blocks(c)["qkv"])
    gate, up = row_ranges(MLP.named(c.mlp).row_blocks(c)["fc"])
    blocks = {  # their projection: (our layer, rows of it)
        "self_attn.q_proj": ("attn.qkv", q),
        "self_attn.k_proj": ("attn.qkv", k),
        "self_attn.v_proj": ("attn.qkv", v),
        "self_attn.o_proj": ("attn.proj", None),
        "mlp.gate_proj": ("mlp.fc", gate),
        "mlp.up_proj": ("mlp.fc", up),
        "mlp.down_proj": ("mlp.proj", None),
    }
    yield Link("model.embed_tokens.weight", "wte.weight")
    yield Link("model.norm.weight", "norm_f.weight")
    for i in range(c.n_layers):
        ours, theirs = f"blocks.{i}", f"model.layers.{i}"
        yield Link(f"{theirs}.input_layernorm.weight", f"{ours}.norm_1.weight")
        yield Link(f"{theirs}.post_attention_layernorm.weight", f"{ours}.norm_2.weight")
        for name, (layer, rows) in blocks.items():
            for kind in ("weight", "bias") if c.bias else ("weight",):
                yield Link(f"{theirs}.{name}.{kind}", f"{ours}.{layer}.{kind}", rows=rows)
        if c.qk_norm:
            yield Link(f"{theirs}.self_attn.q_norm.weight", f"{ours}.attn.q_norm.weight")
            yield Link(f"{theirs}.self_attn.k_norm.weight", f"{ours}.attn.k_norm.weight")
    if not c.tie_embeddings:
        yield Link("lm_head.weight", "lm_head.weight")


def row_ranges(blocks: tuple[int, ...]) -> list[tuple[int, int]]:
    """(start, end) rows of each block of a fused weight, from its block sizes (a layer's ``row_blocks``)."""
    ends = list(itertools.accumulate(blocks))
    return list(zip([0, *ends[:-1]], ends, strict=True))


def _norm_links(theirs: str, ours: str, c: GPTConfig) -> Iterator[Link]:
    yield Link(f"{theirs}.weight", f"{ours}.weight")
    yield _bias_link(f"{theirs}.bias", f"{ours}.bias", c.embed_dim, c)


def _bias_link(theirs: str, ours: str, width: int, c: GPTConfig) -> Link:
    return Link(theirs, ours) if c.bias else Link(theirs, None, zeros=(width,))


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """gptlit GPT state_dict -> the state_dict of the transformers model that is exactly ``config``.

    A tied head is left out (``tie_word_embeddings`` ties it to the embedding when the model loads).
    """
    out = {}
    for link in links(config):
        if link.ours is None:
            tensor = torch.zeros(link.zeros, dtype=state_dict["wte.weight"].dtype)
        else:
            tensor = state_dict[link.ours]
        if link.rows is not None:
            tensor = tensor[link.rows[0] : link.rows[1]]
        if link.neox_heads is not None:  # (3, nh, hs, ...) -> (nh, 3, hs, ...)
            tensor = tensor.reshape(3, link.neox_heads, -1, *tensor.shape[1:]).transpose(0, 1).flatten(0, 2)
        if link.transpose:
            tensor = tensor.t()
        out[link.theirs] = tensor.detach().clone().contiguous()
    return out


def from_hf_state_dict(state_dict: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """The inverse of `to_hf_state_dict`: a transformers state_dict -> gptlit GPT state_dict."""
    blocks: dict[str, list[tuple[int, torch.Tensor]]] = {}  # our name -> (first row, tensor) pieces
    for link in links(config):
        if link.ours is None:
            continue  # zeros gptlit does not store
        tensor = state_dict[link.theirs]
        if link.transpose:
            tensor = tensor.t()
        if link.neox_heads is not None:  # (nh, 3, hs, ...) -> (3, nh, hs, ...)
            tensor = tensor.reshape(link.neox_heads, 3, -1, *tensor.shape[1:]).transpose(0, 1).flatten(0, 2)
        blocks.setdefault(link.ours, []).append((link.rows[0] if link.rows else 0, tensor))
    out = {
        name: torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])]).clone() for name, pieces in blocks.items()
    }
    if config.tie_embeddings:
        out["lm_head.weight"] = out["wte.weight"]
    return out
