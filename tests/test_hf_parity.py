"""Every gptlit variant against the transformers architecture that is exactly it (GPT-NeoX, GPT-2, Llama, Qwen3),
built from a config (no download), with the same weights: logits, training loss and gradients, greedy tokens."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never the network

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from gptlit.errors import UsageError
from gptlit.export.architectures import from_hf_state_dict, hf_config_dict, hf_model_type, links, to_hf_state_dict
from gptlit.generation.generate import generate
from gptlit.model.config import GPTConfig
from gptlit.model.gpt import GPT
from gptlit.model.rope import RotaryQKV

SHAPE = dict(vocab_size=113, block_size=32, embed_dim=48, n_heads=4, n_layers=2, dropout=0.0)
# name: (variant, the transformers model_type it is)
VARIANTS = {
    "neox": ({}, "gpt_neox"),
    "neox-relu2-untied-nobias": (dict(mlp="relu2", tie_embeddings=False, bias=False), "gpt_neox"),
    "gpt2": (dict(use_rope=False), "gpt2"),
    "gpt2-relu2-untied-nobias": (dict(use_rope=False, mlp="relu2", tie_embeddings=False, bias=False), "gpt2"),
    "llama-gqa": (dict(norm_type="rmsnorm", mlp="swiglu", n_kv_heads=2, bias=False), "llama"),
    "llama-mha-bias-untied": (dict(norm_type="rmsnorm", mlp="swiglu", tie_embeddings=False), "llama"),
    "qwen3-mqa": (dict(norm_type="rmsnorm", mlp="swiglu", n_kv_heads=1, qk_norm=True, bias=False), "qwen3"),
}


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter pushed off its init (norm gains and biases included), so that each one matters."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def hf_model(config: GPTConfig) -> torch.nn.Module:
    fields = {k: v for k, v in hf_config_dict(config).items() if k not in ("architectures", "model_type")}
    hf_config = AutoConfig.for_model(hf_model_type(config), **fields)
    return AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()


def as_loaded(state_dict: dict, model: torch.nn.Module) -> dict:
    """GPT-NeoX's head under the name this transformers gives it: the export writes 4.x's "embed_out", which
    ``from_pretrained`` of transformers 5 reads as "lm_head"."""
    if "embed_out.weight" in state_dict and not hasattr(model, "embed_out"):
        state_dict["lm_head.weight"] = state_dict.pop("embed_out.weight")
    return state_dict


@pytest.fixture(scope="module", params=VARIANTS, ids=list(VARIANTS))
def pair(request) -> tuple[GPTConfig, GPT, torch.nn.Module]:
    """gptlit's model (weights off init) and the transformers model with its weights, for one variant."""
    variant, model_type = VARIANTS[request.param]
    config = GPTConfig(**SHAPE, **variant)
    assert hf_model_type(config) == model_type
    ours = perturbed(GPT(config), seed=1)
    theirs = hf_model(config)
    result = theirs.load_state_dict(as_loaded(to_hf_state_dict(ours.state_dict(), config), theirs), strict=False)
    assert not result.unexpected_keys
    tied = {"lm_head.weight", "embed_out.weight"} if config.tie_embeddings else set()
    assert set(result.missing_keys) <= tied
    return config, ours, theirs


@pytest.mark.parametrize(("batch", "length"), [(1, 1), (2, 7), (3, 32)])
def test_logits_match(pair, batch, length):
    config, ours, theirs = pair
    idx = torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        expected = theirs(idx).logits
        actual = ours(idx)
    assert expected.abs().max() > 1.0  # not a degenerate near-zero output
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_training_loss_and_gradients_match(pair, monkeypatch):
    # In training, gptlit's attention takes its eager fast path (gptlit.model.rope.RotaryQKV) unless the variant
    # normalizes q and k first, and its loss the chunked head: the loss and every gradient must still be theirs.
    config, ours, theirs = (copy.deepcopy(m) for m in pair)
    ours.train()
    theirs.train()
    idx, targets = torch.randint(0, config.vocab_size, (2, 2, 32), generator=torch.Generator().manual_seed(5))
    fast_path, apply = [], RotaryQKV.apply
    monkeypatch.setattr(RotaryQKV, "apply", lambda *args: fast_path.append(1) or apply(*args))
    loss = ours.loss(idx, targets)
    assert len(fast_path) == (config.n_layers if config.use_rope and not config.qk_norm else 0)
    loss.backward()
    expected = F.cross_entropy(theirs(idx).logits.flatten(0, 1), targets.flatten())
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    grads = as_loaded(to_hf_state_dict({name: p.grad for name, p in ours.named_parameters()}, config), theirs)
    mapped = {link.theirs for link in links(config) if link.ours is not None} | {"lm_head.weight"}
    for name, p in theirs.named_parameters():
        if name in mapped:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_state_dict_round_trip(pair):
    config, ours, _ = pair
    back = from_hf_state_dict(to_hf_state_dict(ours.state_dict(), config), config)
    assert back.keys() == ours.state_dict().keys()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize("length", [1, 11])
def test_greedy_generation_matches(pair, length):
    config, ours, theirs = pair
    new = config.block_size - length
    prompt = torch.randint(3, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    expected = theirs.generate(
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


def test_the_neox_layout_is_interleaved_per_head():
    config = GPTConfig(**SHAPE)
    sd = perturbed(GPT(config), seed=3).state_dict()
    theirs = to_hf_state_dict(sd, config)
    qkv = "gpt_neox.layers.0.attention.query_key_value.weight"
    assert not torch.equal(theirs[qkv], sd["blocks.0.attn.qkv.weight"])  # not an identity copy
    assert theirs["gpt_neox.embed_in.weight"].data_ptr() != sd["wte.weight"].data_ptr()  # copies, not views


@pytest.mark.parametrize(
    "variant",
    [
        dict(norm_type="rmsnorm"),  # RMSNorm with a GELU MLP: no architecture
        dict(mlp="swiglu"),  # LayerNorm with SwiGLU
        dict(n_kv_heads=2),  # GQA with LayerNorm
        dict(use_rope=False, norm_type="rmsnorm", mlp="swiglu"),  # Llama with learned positions
        dict(norm_type="rmsnorm", mlp="swiglu", qk_norm=True),  # Qwen3's MLP has no bias
        dict(qk_norm=True),
        dict(norm_type="rmsnorm", mlp="geglu", bias=False),  # Llama's shape with GELU gating: Gemma is not it
    ],
    ids=str,
)
def test_variants_without_an_exact_architecture_are_refused_naming_those_that_export(variant):
    config = GPTConfig(**SHAPE, **variant)
    for convert in (lambda: hf_config_dict(config), lambda: to_hf_state_dict(GPT(config).state_dict(), config)):
        with pytest.raises(UsageError, match=r"no transformers architecture is exactly this model.*GPT-NeoX.*Qwen3"):
            convert()


def test_geglu_is_refused_naming_why():
    config = GPTConfig(**SHAPE, mlp="geglu", norm_type="rmsnorm", bias=False)
    with pytest.raises(UsageError, match=r"; mlp geglu: Gemma's GELU-gated MLP is the tanh approximation of GELU"):
        hf_model_type(config)
