"""Optimizers and schedules (gptlit.training.optim): the groups, Muon beside AdamW as one optimizer, WSD."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from helpers import MODEL, tiny_model

from gptlit.errors import ConfigError
from gptlit.model.config import GPTConfig
from gptlit.model.layers import GeluMLP
from gptlit.training.module import GPTLitModule
from gptlit.training.optim import (
    Muon,
    MuonAdamW,
    build_adamw,
    build_muon,
    lr_factor,
    parameter_groups,
    schedule,
    shape_lr,
    wsd_factor,
)

MUON = dict(muon_lr=0.02, muon_momentum=0.95, muon_weight_decay=0.01, muon_adjust_lr="original")


def test_wsd_warms_up_holds_then_decays_linearly_to_the_minimum():
    factors = [wsd_factor(step, 10, 100, 0.1, 0.2) for step in range(101)]
    assert factors[0] == pytest.approx(1 / 11) and factors[9] == pytest.approx(10 / 11)
    assert factors[10:80] == [1.0] * 70  # stable at the peak until the last 20 steps
    assert factors[80] == pytest.approx(1 - 0.9 / 20) and factors[89] == pytest.approx(0.55)
    assert factors[99] == pytest.approx(0.1) == factors[100]  # the minimum at the last step, and after
    assert all(a > b for a, b in itertools.pairwise(factors[79:100]))
    # The cosine schedule, for comparison: it leaves the peak right after warmup.
    assert lr_factor(11, 10, 100, 0.1) < 1.0


@pytest.mark.parametrize(
    "variant", [{}, dict(tie_embeddings=False, use_rope=False, qk_norm=True)], ids=["tied", "untied"]
)
def test_each_parameter_in_one_group_matrices_only_from_the_blocks(variant):
    model = tiny_model(**variant)
    groups = parameter_groups(model)
    ids = [id(p) for group in groups.values() for p in group]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    blocks = {id(p) for block in model.blocks for p in block.parameters() if p.dim() == 2}
    assert {id(p) for p in groups["matrices"]} == blocks
    assert [id(p) for p in groups["head"]] == ([] if model.config.tie_embeddings else [id(model.lm_head.weight)])
    assert id(model.wte.weight) in {id(p) for p in groups["no_decay"]}


def train(model, optimizer, steps: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randint(0, model.config.vocab_size, (2, 2, 16), generator=generator)
        model.loss(x, y).backward()
        optimizer.step()
        optimizer.zero_grad()


def test_muon_updates_the_matrices_and_adamw_the_rest_as_one_optimizer():
    model = tiny_model(tie_embeddings=False).train()
    optimizer = build_muon(model, 1e-3, 0.1, (0.9, 0.95), **MUON)
    assert isinstance(optimizer, MuonAdamW)
    assert [g["name"] for g in optimizer.param_groups] == ["muon", "head", "no_decay"]
    assert optimizer.muon.param_groups[0] is optimizer.param_groups[0]  # shared: a scheduler's lr reaches Muon
    before = copy.deepcopy(model.state_dict())
    train(model, optimizer, 2)
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # every parameter moved
    muon_state = optimizer.state[model.blocks[0].attn.qkv.weight]
    assert set(muon_state) == {"momentum_buffer"}
    assert {"exp_avg", "exp_avg_sq"} <= set(optimizer.state[model.wte.weight])
    # Muon orthogonalizes: the update of a matrix is not AdamW's.
    adamw_model = tiny_model(tie_embeddings=False).train()
    train(adamw_model, build_adamw(adamw_model, 1e-3, 0.1, (0.9, 0.95)), 2)
    assert not torch.allclose(model.blocks[0].mlp.fc.weight, adamw_model.blocks[0].mlp.fc.weight)


def test_a_saved_and_restored_muon_optimizer_goes_on_exactly():
    """What resuming a run needs: state_dict holds both optimizers' state, load_state_dict restores it."""
    straight = tiny_model().train()
    optimizer = build_muon(straight, 1e-3, 0.1, (0.9, 0.95), **MUON)
    train(straight, optimizer, 3, seed=0)
    saved_model, saved_optimizer = copy.deepcopy(straight.state_dict()), copy.deepcopy(optimizer.state_dict())
    train(straight, optimizer, 3, seed=1)

    resumed = tiny_model().train()
    resumed.load_state_dict(saved_model)
    optimizer = build_muon(resumed, 1e-3, 0.1, (0.9, 0.95), **MUON)
    optimizer.load_state_dict(saved_optimizer)
    assert optimizer.muon.state is optimizer.state and optimizer.adamw.param_groups[0] is optimizer.param_groups[1]
    train(resumed, optimizer, 3, seed=1)
    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


def test_muon_in_bfloat16_is_torchs_muon_and_float32_stays_close():
    """gptlit's Muon only chooses the dtype of the Newton-Schulz iteration: in bfloat16 it is torch's step."""
    torch.manual_seed(0)
    weights = [torch.randn(48, 16), torch.randn(16, 40)]  # both orientations of a rectangle
    grads = [[torch.randn_like(w) for w in weights] for _ in range(3)]

    def run(optimizer_class, **options) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        optimizer = optimizer_class(params, lr=0.02, weight_decay=0.1, adjust_lr_fn="original", **options)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
        return [p.detach() for p in params]

    for ours, theirs in zip(run(Muon, ns_dtype=torch.bfloat16), run(torch.optim.Muon), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    for ours, theirs in zip(run(Muon, ns_dtype=torch.float32), run(torch.optim.Muon), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-3)  # bfloat16's rounding, no more


def test_a_fused_matrix_is_orthogonalized_block_by_block_as_the_matrices_it_stands_for():
    torch.manual_seed(1)
    q, k, v = (torch.randn(16, 12) for _ in range(3))
    grads = [torch.randn(48, 12) for _ in range(2)]
    fused = torch.nn.Parameter(torch.cat([q, k, v]))
    apart = [torch.nn.Parameter(w.clone()) for w in (q, k, v)]
    fused_optimizer = Muon([fused], ns_dtype=torch.float32, row_blocks={id(fused): (16, 16, 16)}, lr=0.02)
    apart_optimizer = Muon(apart, ns_dtype=torch.float32, lr=0.02)
    for g in grads:
        fused.grad = g.clone()
        for p, block in zip(apart, g.split(16), strict=True):
            p.grad = block.clone()
        fused_optimizer.step()
        apart_optimizer.step()
    torch.testing.assert_close(fused.detach(), torch.cat([p.detach() for p in apart]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mlp", ["swiglu", "geglu"])
def test_muon_orthogonalizes_a_gated_mlps_gate_and_up_apart(mlp):
    model = tiny_model(mlp=mlp).train()
    optimizer = build_muon(model, 1e-3, 0.1, (0.9, 0.95), **MUON)
    fc = model.blocks[0].mlp.fc.weight
    x, y = torch.randint(0, model.config.vocab_size, (2, 2, 16), generator=torch.Generator().manual_seed(0))
    model.loss(x, y).backward()
    gate_and_up = [torch.nn.Parameter(w.detach().clone()) for w in fc.chunk(2)]
    for p, g in zip(gate_and_up, fc.grad.chunk(2), strict=True):
        p.grad = g.clone()
    optimizer.step()
    Muon(gate_and_up, ns_dtype=torch.float32, lr=0.02, momentum=0.95, weight_decay=0.01).step()
    torch.testing.assert_close(fc.detach(), torch.cat([p.detach() for p in gate_and_up]), rtol=0, atol=1e-6)
    before = copy.deepcopy(model.state_dict())
    train(model, optimizer, 2)
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # a few steps train them all


class WidenedFc(GeluMLP):
    """A gated MLP that widens fc to [gate; up] by hand instead of declaring its two blocks."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.fc = torch.nn.Linear(config.embed_dim, 2 * config.hidden_size)


class Undeclared(torch.nn.Module):
    """A layer written from scratch, with no row_blocks at all."""

    def __init__(self, config) -> None:
        super().__init__()
        self.up = torch.nn.Linear(config.embed_dim, config.embed_dim)


@pytest.mark.parametrize("layer", [WidenedFc, Undeclared])
def test_muon_refuses_a_linear_layer_whose_row_blocks_are_not_declared(layer):
    """A fused matrix Muon would orthogonalize as one, unnoticed: refused instead, naming the layer."""
    model = tiny_model()
    model.blocks[1].mlp = layer(model.config)
    name = "fc" if layer is WidenedFc else "up"
    with pytest.raises(TypeError, match=rf"{layer.__name__}\.{name} \(\d+ rows\) has no row blocks"):
        build_muon(model, 1e-3, 0.1, (0.9, 0.95), **MUON)


def test_an_unknown_schedule_name_is_refused_in_one_line():
    assert schedule("cosine", 0.2) is lr_factor
    assert schedule("wsd", 0.5)(9, 0, 10, 0.0) == pytest.approx(0.0)
    with pytest.raises(ConfigError, match=r"^model\.schedule must be one of cosine, wsd, got 'cosin'$"):
        schedule("cosin", 0.2)


def test_an_unknown_optimizer_name_is_refused_in_one_line():
    """Not AdamW in its place: the name is checked when the module is built."""
    with pytest.raises(ConfigError, match=r"^model\.optimizer must be one of adamw, muon, got 'adam'$"):
        GPTLitModule(config=GPTConfig(**MODEL, vocab_size=64), optimizer="adam")


def test_an_unknown_muon_adjust_lr_is_refused_in_one_line():
    """Not ``original`` in its place: refused by the module, and by the step that reads it from the group."""
    message = r"^model\.muon_adjust_lr must be one of original, match_rms_adamw, got 'orignal'$"
    with pytest.raises(ConfigError, match=message):
        GPTLitModule(config=GPTConfig(**MODEL, vocab_size=64), optimizer="muon", muon_adjust_lr="orignal")
    with pytest.raises(ConfigError, match=message):
        shape_lr(0.02, "orignal", torch.Size((64, 16)))
    assert shape_lr(0.02, None, torch.Size((64, 16))) == shape_lr(0.02, "original", torch.Size((64, 16))) == 0.04
