"""FSDP: what gptlit does differently under a sharded strategy.

Lightning refuses FSDP without CUDA, so no FSDP run happens on a CPU: these tests check the dispatch with
Lightning's real FSDPStrategy object standing in for a launched one (README: "what is tested where")."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from helpers import MODEL
from lightning.pytorch.strategies import FSDPStrategy

from gptlit.model.config import GPTConfig
from gptlit.training.module import GPTLitModule
from gptlit.training.text_samples import sampling_model


class RootModule:
    """Records what FSDP's root module was asked to clip."""

    def __init__(self) -> None:
        self.clipped: list[float] = []

    def clip_grad_norm_(self, max_norm: float) -> None:
        self.clipped.append(max_norm)


def fsdp_trainer(**attributes) -> SimpleNamespace:
    strategy = FSDPStrategy(state_dict_type="full")
    strategy.model = RootModule()
    return SimpleNamespace(strategy=strategy, precision="bf16-mixed", **attributes)


def test_gradients_are_clipped_by_their_global_norm_through_the_root_fsdp_module() -> None:
    """torch.nn.utils.clip_grad_norm_ over one process's shards would clip each shard by its own norm."""
    module = GPTLitModule(GPTConfig(vocab_size=101, **MODEL))
    trainer = fsdp_trainer()
    module._trainer = trainer
    for p in module.parameters():
        p.grad = torch.full_like(p, 10.0)
    module.configure_gradient_clipping(None, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
    assert trainer.strategy.model.clipped == [0.5]
    assert all((p.grad == 10.0).all() for p in module.parameters())  # left to the root module
    module.configure_gradient_clipping(None, gradient_clip_val=0.5, gradient_clip_algorithm="value")
    assert all((p.grad == 0.5).all() for p in module.parameters())  # elementwise: each shard on its own


def test_every_process_gathers_the_weights_and_the_first_samples_from_a_plain_copy() -> None:
    module = GPTLitModule(GPTConfig(vocab_size=101, **MODEL))
    gathered = []

    def full_state() -> dict:
        gathered.append(1)
        return {f"model.{k}": v + 1.0 for k, v in module.model.state_dict().items()}  # "the full weights"

    for rank in (1, 0):
        trainer = fsdp_trainer(is_global_zero=rank == 0)
        trainer.strategy.lightning_module_state_dict = full_state
        model = sampling_model(trainer, module)
        assert len(gathered) == 2 - rank  # every rank takes part in the gather
        assert (model is None) == (rank != 0)
    assert model is not module.model
    torch.testing.assert_close(model.wte.weight, module.model.wte.weight + 1.0)
