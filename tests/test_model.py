"""GPTConfig validation, the GPT's forward pass, init, accounting and KV cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import VARIANTS

from gptlit.model.config import GPTConfig
from gptlit.model.gpt import GPT

POSITIONS = pytest.mark.parametrize("use_rope", [True, False], ids=["rope", "learned"])


def tiny_config(**overrides) -> GPTConfig:
    fields = dict(vocab_size=101, block_size=32, embed_dim=32, n_heads=4, n_layers=2, dropout=0.0)
    return GPTConfig(**{**fields, **overrides})


def tiny_model(seed: int = 0, **overrides) -> GPT:
    """A tiny GPT in eval mode whose weights are large enough that its logits are far from uniform."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


# GPTConfig -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(embed_dim=30, n_heads=4), "embed_dim"),
        (dict(embed_dim=12, n_heads=4, use_rope=True), "use_rope"),  # head size 3
        (dict(block_size=0), "block_size"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(norm_type="batchnorm"), "norm_type"),
        (dict(dropout=1.0), "dropout"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(n_kv_heads=0), "n_kv_heads"),
        (dict(mlp="reglu"), "mlp"),
        (dict(mlp_hidden=0), "mlp_hidden"),
    ],
)
def test_config_rejects_bad_fields(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


@pytest.mark.parametrize(
    ("embed_dim", "mlp", "mlp_hidden", "hidden"),
    [
        (288, "swiglu", None, 768),
        (512, "swiglu", None, 1376),
        (64, "gelu", None, 256),
        (64, "relu2", None, 256),
        (64, "swiglu", 100, 100),
        (288, "geglu", None, 768),
        (64, "geglu", 100, 100),
    ],
)
def test_mlp_hidden_width_rule(embed_dim, mlp, mlp_hidden, hidden):
    """SwiGLU and GeGLU: 8/3 of embed_dim rounded up to a multiple of 32 (llama2.c's 15M model: 288 -> 768)."""
    config = tiny_config(embed_dim=embed_dim, mlp=mlp, mlp_hidden=mlp_hidden)
    assert config.hidden_size == hidden
    fc = GPT(config).blocks[0].mlp.fc
    assert fc.out_features == (2 if mlp in ("swiglu", "geglu") else 1) * hidden


def test_config_odd_head_size_is_fine_without_rope():
    config = tiny_config(embed_dim=12, n_heads=4, use_rope=False)
    logits = GPT(config)(torch.zeros(1, 3, dtype=torch.long))
    assert config.head_size == 3 and logits.shape == (1, 3, config.vocab_size)


# Forward, backward, init ---------------------------------------------------------------------------


@POSITIONS
@pytest.mark.parametrize("variant", [dict(norm_type="layernorm"), dict(norm_type="rmsnorm"), *VARIANTS], ids=str)
def test_forward_backward_every_parameter_gets_a_gradient(variant, use_rope):
    torch.manual_seed(0)
    norm_type = variant.get("norm_type", "layernorm")
    model = GPT(tiny_config(use_rope=use_rope, dropout=0.1, **variant)).train()
    idx = torch.randint(0, model.config.vocab_size, (2, model.config.block_size + 1))
    logits = model(idx[:, :-1])
    assert logits.shape == (2, model.config.block_size, model.config.vocab_size)
    loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    norm_cls = torch.nn.RMSNorm if norm_type == "rmsnorm" else torch.nn.LayerNorm
    assert isinstance(model.blocks[0].norm_1, norm_cls)
    assert (model.wpe is None) == use_rope


def test_forward_rejects_sequences_longer_than_block_size():
    model = GPT(tiny_config(block_size=8))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_init_std_and_tied_head():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=300, block_size=16, embed_dim=256, n_heads=4, n_layers=4)
    model = GPT(config)
    residual_std = 0.02 / math.sqrt(2 * config.n_layers)
    for block in model.blocks:
        for linear in (block.attn.qkv, block.mlp.fc):
            assert linear.weight.std().item() == pytest.approx(0.02, rel=0.05)
            assert torch.count_nonzero(linear.bias) == 0
        for linear in (block.attn.proj, block.mlp.proj):
            assert linear.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    # The head is the embedding matrix itself, not a copy.
    assert model.lm_head.weight is model.wte.weight
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()
    with torch.no_grad():
        model.wte.weight[0, 0] = 7.0
    assert model.lm_head.weight[0, 0].item() == 7.0


def test_an_untied_head_has_its_own_matrix():
    model = GPT(tiny_config(tie_embeddings=False))
    assert model.lm_head.weight is not model.wte.weight
    assert model.lm_head.weight.data_ptr() != model.wte.weight.data_ptr()
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.2)


def expected_params(config: GPTConfig) -> int:
    C, V = config.embed_dim, config.vocab_size
    per_layer = (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C) + 2 * (2 * C)
    return V * C + config.n_layers * per_layer + 2 * C + (0 if config.use_rope else config.block_size * C)


@POSITIONS
def test_num_params_counts_the_tied_matrix_once(use_rope):
    config = tiny_config(use_rope=use_rope)
    model = GPT(config)
    assert model.num_params() == expected_params(config)
    wpe = 0 if use_rope else config.block_size * config.embed_dim
    assert model.num_params(non_embedding=True) == expected_params(config) - config.vocab_size * config.embed_dim - wpe


def test_untied_head_in_the_counts():
    tied, untied = GPT(tiny_config()), GPT(tiny_config(tie_embeddings=False))
    head = tied.config.vocab_size * tied.config.embed_dim
    assert untied.num_params() == tied.num_params() + head
    assert untied.num_params(non_embedding=True) == tied.num_params(non_embedding=True) + head
    assert untied.flops_per_token() == tied.flops_per_token()  # the same matrix products


@POSITIONS
def test_flops_per_token_formula(use_rope):
    config = tiny_config(use_rope=use_rope)
    model = GPT(config)
    wpe = 0 if use_rope else config.block_size * config.embed_dim
    n = expected_params(config) - wpe  # matrix weights, tied head counted once, no position table

    def attention(T):
        return 12 * config.n_layers * T * config.embed_dim

    assert model.flops_per_token() == 6 * n + attention(config.block_size)
    assert model.flops_per_token(seq_len=7) == 6 * n + attention(7)


# Causality and positions ---------------------------------------------------------------------------


@POSITIONS
def test_future_tokens_never_change_earlier_logits(use_rope):
    model = tiny_model(use_rope=use_rope)
    idx = torch.randint(0, model.config.vocab_size, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % model.config.vocab_size
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@POSITIONS
def test_positions_matter(use_rope):
    # Without position information, the last position's logits would be the same for any order of the
    # earlier tokens (attention is a weighted set); so shuffle those and keep the last token.
    model = tiny_model(use_rope=use_rope)
    idx = torch.arange(1, 17).unsqueeze(0)  # (1, 16), distinct tokens
    shuffled = torch.cat((idx[:, :-1].flip(1), idx[:, -1:]), dim=1)
    with torch.no_grad():
        a, b = model(idx)[:, -1], model(shuffled)[:, -1]
    assert (a - b).abs().max() > 1e-3


# KV cache ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [dict(use_rope=True), dict(use_rope=False), *VARIANTS], ids=str)
def test_prefill_then_decode_matches_full_forward(variant):
    model = tiny_model(**variant)
    idx = torch.randint(0, model.config.vocab_size, (3, 24))
    with torch.no_grad():
        full = model(idx)  # (B, T, V)
        model.set_kv_cache(batch_size=3)
        prefill = model(idx[:, :10], input_pos=torch.arange(10))
        chunk = model(idx[:, 10:15], input_pos=torch.arange(10, 15))  # several tokens at once
        decoded = [model(idx[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(15, 24)]
    cached = torch.cat([prefill, chunk, *decoded], dim=1)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_the_kv_cache_holds_n_kv_heads_heads():
    model = tiny_model(n_kv_heads=2)  # 4 query heads
    model.set_kv_cache(batch_size=3, max_seq_len=16)
    assert model.blocks[0].attn.kv_cache.k.shape == model.blocks[0].attn.kv_cache.v.shape == (3, 2, 16, 8)


def test_cache_len_reads_only_the_written_positions():
    model = tiny_model()
    idx = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(idx)
        model.set_kv_cache(batch_size=2)
        for block in model.blocks:  # positions not yet written hold NaN: reading them would spread it
            block.attn.kv_cache.k.fill_(float("nan"))
            block.attn.kv_cache.v.fill_(float("nan"))
        prefill = model(idx[:, :8], torch.arange(8), cache_len=8)
        chunk = model(idx[:, 8:], torch.arange(8, 12), cache_len=12)
        assert model(idx[:, 8:], torch.arange(8, 12)).isnan().any()  # the whole cache, masked: NaN all the same
    torch.testing.assert_close(torch.cat([prefill, chunk], dim=1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_buffers_stay_out_of_the_state_dict():
    model = tiny_model()
    keys = set(model.state_dict())
    model.set_kv_cache(batch_size=2, max_seq_len=16)
    assert model.kv_cache_shape == (2, 16)
    assert model.blocks[0].attn.kv_cache.k.shape == (2, 4, 16, 8)
    assert set(model.state_dict()) == keys
    assert not any("kv_cache" in k or "causal_mask" in k or "rope" in k for k in keys)
    # A model with a cache loads a state_dict from one without (and the other way round).
    GPT(model.config).load_state_dict(model.state_dict())
    model.clear_kv_cache()
    assert model.kv_cache_shape is None and model.causal_mask is None


def test_set_kv_cache_longer_than_block_size_raises():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        model.set_kv_cache(batch_size=1, max_seq_len=model.config.block_size + 1)


def test_forward_with_input_pos_needs_a_kv_cache():
    model = tiny_model()
    with pytest.raises(RuntimeError, match="set_kv_cache"):
        model(torch.zeros(1, 2, dtype=torch.long), input_pos=torch.arange(2))
