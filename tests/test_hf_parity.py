"""gptlit's GPT against Hugging Face's GPTNeoXForCausalLM, built from a config (no download)."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never the network

import pytest
import torch
import torch.nn.functional as F
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from gptlit.config import GPTConfig
from gptlit.generate import generate
from gptlit.hf_mapping import (
    check_neox_compatible,
    from_neox_state_dict,
    neox_config_dict,
    to_neox_state_dict,
)
from gptlit.model import GPT
from gptlit.rope import RotaryQKV

CONFIG = GPTConfig(vocab_size=113, block_size=32, embed_dim=48, n_heads=4, n_layers=2, dropout=0.0)


def neox_model(config: GPTConfig, seed: int = 0) -> GPTNeoXForCausalLM:
    """A random GPT-NeoX whose every parameter, LayerNorms included, is pushed off its init."""
    torch.manual_seed(seed)
    fields = {k: v for k, v in neox_config_dict(config).items() if k not in ("architectures", "model_type")}
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**fields)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.fixture(scope="module")
def models() -> tuple[GPTNeoXForCausalLM, GPT]:
    hf = neox_model(CONFIG)
    ours = GPT(CONFIG).eval()
    ours.load_state_dict(from_neox_state_dict(hf.state_dict(), CONFIG))  # strict: every key matched
    return hf, ours


def test_neox_config_matches(models):
    hf, _ = models
    c = hf.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers) == (113, 48, 2)
    assert (c.num_attention_heads, c.intermediate_size, c.max_position_embeddings) == (4, 192, 32)
    assert c.tie_word_embeddings and not c.use_parallel_residual
    assert hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    # The perturbation reached the LayerNorms (which init to ones and zeros).
    norm = hf.gpt_neox.layers[0].input_layernorm
    assert (norm.weight - 1).abs().min() > 0 and norm.bias.abs().min() > 0


@pytest.mark.parametrize(("batch", "length"), [(1, 1), (2, 7), (3, 32)])
def test_logits_match(models, batch, length):
    hf, ours = models
    idx = torch.randint(0, CONFIG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        expected = hf(idx).logits
        actual = ours(idx)
    assert expected.dtype == actual.dtype == torch.float32
    assert expected.abs().max() > 1.0  # not a degenerate near-zero output
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_training_loss_and_gradients_match(models, monkeypatch):
    # In training, gptlit's attention takes its eager fast path (gptlit.rope.RotaryQKV) and its loss the
    # chunked head: the loss and every gradient must still be GPT-NeoX's.
    hf, ours = (copy.deepcopy(m).train() for m in models)
    idx, targets = torch.randint(0, CONFIG.vocab_size, (2, 2, 32), generator=torch.Generator().manual_seed(5))
    fast_path, apply = [], RotaryQKV.apply
    monkeypatch.setattr(RotaryQKV, "apply", lambda *args: fast_path.append(1) or apply(*args))
    loss = ours.loss(idx, targets)
    assert len(fast_path) == CONFIG.n_layers
    loss.backward()
    logits = hf(idx).logits
    expected = F.cross_entropy(logits.view(-1, CONFIG.vocab_size), targets.reshape(-1))
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    grads = to_neox_state_dict({name: p.grad for name, p in ours.named_parameters()}, CONFIG)
    for name, p in hf.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_export_direction_matches_too():
    # gptlit weights (perturbed off init) -> GPT-NeoX state_dict -> same logits.
    torch.manual_seed(1)
    ours = GPT(CONFIG).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    hf = neox_model(CONFIG, seed=2)
    result = hf.load_state_dict(to_neox_state_dict(ours.state_dict(), CONFIG), strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= {"lm_head.weight", "embed_out.weight"}  # tied to embed_in
    idx = torch.randint(0, CONFIG.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip(models):
    hf, _ = models
    sd = hf.state_dict()
    back = to_neox_state_dict(from_neox_state_dict(sd, CONFIG), CONFIG)
    assert set(back) == set(sd) - {"lm_head.weight", "embed_out.weight"}
    for name, tensor in back.items():
        assert torch.equal(tensor, sd[name]), name
    # The QKV layouts really differ (per-head interleaved vs stacked): not an identity copy.
    ours = from_neox_state_dict(sd, CONFIG)
    qkv = "gpt_neox.layers.0.attention.query_key_value.weight"
    assert not torch.equal(ours["blocks.0.attn.qkv.weight"], sd[qkv])
    # Converted tensors do not share storage with their source.
    assert ours["wte.weight"].data_ptr() != sd["gpt_neox.embed_in.weight"].data_ptr()


@pytest.mark.parametrize("length", [1, 4, 11])
def test_greedy_generation_matches(models, length):
    hf, ours = models
    new = 32 - length
    prompt = torch.randint(3, CONFIG.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    expected = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new,
        min_new_tokens=new,  # eos (id 2) suppressed: always `new` tokens
        do_sample=False,
        use_cache=True,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert expected.shape == (1, length + new)
    assert generate(ours, prompt, new, temperature=0) == [expected[0, length:].tolist()]


@pytest.mark.parametrize(
    ("overrides", "option"),
    [(dict(norm_type="rmsnorm"), "norm_type"), (dict(use_rope=False), "use_rope"), (dict(bias=False), "bias")],
)
def test_configs_without_a_neox_equivalent_are_refused(overrides, option):
    config = GPTConfig(**{**CONFIG.to_dict(), **overrides})
    sd = GPT(config).state_dict()
    for convert in (
        lambda: check_neox_compatible(config),
        lambda: neox_config_dict(config),
        lambda: to_neox_state_dict(sd, config),
        lambda: from_neox_state_dict({}, config),
    ):
        with pytest.raises(ValueError, match=option):
            convert()
