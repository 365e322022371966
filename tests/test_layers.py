"""The variant classes (gptlit.model.layers): each config name has its class, and each class declares what the optimizer
and the export need of it."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model

from gptlit.export.architectures import ARCHITECTURES
from gptlit.model.config import MLPS, NORMS, GPTConfig
from gptlit.model.layers import MLP, CausalSelfAttention, Norm
from gptlit.training.optim import fused_row_blocks

ATTENTIONS = [{}, dict(n_kv_heads=2), dict(n_kv_heads=1, qk_norm=True)]


def test_every_config_name_has_its_class_and_is_documented():
    assert set(Norm.registry) == set(NORMS) and set(MLP.registry) == set(MLPS)
    for field, names in (("norm_type", NORMS), ("mlp", MLPS)):
        for name in names:
            assert f"``{name}``" in GPTConfig.__doc__, f"GPTConfig's docstring ({field}) does not name {name}"


def test_a_class_registered_under_a_name_the_config_lacks_or_twice_is_refused():
    with pytest.raises(TypeError, match=r"'reglu' is not a free name.*gptlit/model/config\.py"):

        class ReGLU(MLP, name="reglu"):
            pass

    with pytest.raises(TypeError, match="'gelu' is not a free name"):

        class OtherGelu(MLP, name="gelu"):
            pass

    assert MLP.registry["gelu"].__name__ == "GeluMLP" and "reglu" not in MLP.registry


@pytest.mark.parametrize(("norm", "mlp", "attention"), list(itertools.product(NORMS, MLPS, ATTENTIONS)), ids=str)
def test_every_variant_declares_the_row_blocks_of_each_linear_layer_it_owns(norm, mlp, attention):
    """What Muon needs: each fused matrix's blocks (fused_row_blocks refuses a layer without a declaration)."""
    model = tiny_model(norm_type=norm, mlp=mlp, **attention)
    fused = fused_row_blocks(model)  # TypeError for an undeclared layer
    c, block = model.config, model.blocks[0]
    q, kv = c.n_heads * c.head_size, c.kv_heads * c.head_size
    assert fused[id(block.attn.qkv.weight)] == (q, kv, kv)
    assert fused.get(id(block.mlp.fc.weight), (c.hidden_size,)) == (c.hidden_size,) * MLP.named(mlp).fc_blocks
    assert type(block.mlp) is MLP.named(mlp) and type(block.norm_1) is Norm.named(norm)


def test_every_variant_says_whether_it_exports_and_if_not_why():
    for cls in (*Norm.registry.values(), *MLP.registry.values()):
        assert set(cls.exports) <= set(ARCHITECTURES), cls
        assert cls.exports or cls.not_exported, f"{cls.__name__} exports nowhere and does not say why"
        if issubclass(cls, MLP) and cls.exports:
            assert cls.hf_act, f"{cls.__name__} exports but names no activation"
    for attention in ATTENTIONS:
        config = GPTConfig(n_heads=4, embed_dim=32, **attention)
        assert set(CausalSelfAttention.exports(config)) <= set(ARCHITECTURES)


def test_geglu_gates_up_by_the_exact_gelu_of_gate():
    mlp = tiny_model(mlp="geglu").blocks[0].mlp
    hidden = mlp.proj.in_features
    assert type(mlp).__name__ == "GeGLU" and mlp.fc.out_features == 2 * hidden
    h = torch.randn(3, 2 * hidden)
    gate, up = h.chunk(2, dim=-1)
    torch.testing.assert_close(mlp.activation(h), F.gelu(gate) * up, rtol=0, atol=0)
    assert not torch.allclose(mlp.activation(h), F.gelu(gate, approximate="tanh") * up, rtol=0, atol=1e-6)
