"""GPTLitModule: the LightningModule that trains a GPT — loss, metrics, AdamW and its schedule."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torchmetrics import MeanMetric

from gptlit.checkpoint import CHECKPOINT_FORMAT
from gptlit.config import GPTConfig, NormType
from gptlit.errors import ConfigError, NonFiniteLossError, UsageError
from gptlit.model import GPT
from gptlit.tokenizer import Tokenizer


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier at optimizer step ``step``: linear warmup, then cosine to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio)


def build_optimizer(
    model: GPT, learning_rate: float, weight_decay: float, betas: tuple[float, float], fused: bool = True
) -> torch.optim.AdamW:
    """AdamW that decays only the weight matrices of linear layers.

    Biases and norm gains are offsets and scales whose size is meaningful; the tied token embedding is left
    alone too, since rows of rare tokens get few gradient updates and decay would pull them towards zero
    between those updates. The fused kernel (CPU and CUDA) updates all tensors in one pass: on a 2-core CPU
    it is 4x faster than the per-tensor loop.
    """
    decay, no_decay, seen = [], [], {id(model.wte.weight)}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            is_matrix = isinstance(module, torch.nn.Linear) and name == "weight"
            (decay if is_matrix else no_decay).append(param)
    no_decay.append(model.wte.weight)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    fused = fused and all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused or None)


class GPTLitModule(L.LightningModule):
    """Trains a GPT on next-token prediction.

    Args:
        vocab_size: Vocabulary size; linked from the data module (``data.vocab_size``), never set in YAML.
        block_size: Context length; also sets the data module's window length.
        embed_dim: Width of the residual stream.
        n_heads: Attention heads per layer.
        n_layers: Transformer blocks.
        dropout: Dropout on attention and residual branches.
        use_rope: Rotary position embeddings (True) or learned absolute positions (False).
        norm_type: ``layernorm`` or ``rmsnorm``.
        bias: Biases in linear layers and LayerNorm.
        rope_base: Base of the RoPE frequencies.
        learning_rate: Peak learning rate, reached at the end of warmup.
        min_lr: Learning rate at the end of the cosine decay.
        weight_decay: AdamW weight decay, applied to the weight matrices of linear layers only.
        betas: AdamW betas.
        warmup: Warmup length: a float below 1 is a fraction of all optimizer steps, an int a step count.
        compile: Compile the model and its loss with ``torch.compile`` (about a minute at the start on a CPU,
            then 5-15% faster steps there; more on a GPU). Needs a C++ compiler on a CPU.
    """

    def __init__(
        self,
        vocab_size: int = 8000,
        block_size: int = 256,
        embed_dim: int = 512,
        n_heads: int = 8,
        n_layers: int = 6,
        dropout: float = 0.1,
        use_rope: bool = True,
        norm_type: NormType = "layernorm",
        bias: bool = True,
        rope_base: float = 10000.0,
        learning_rate: float = 6e-4,
        min_lr: float = 6e-5,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup: int | float = 0.1,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(warmup, float) and not 0.0 <= warmup < 1.0:
            raise ConfigError(f"warmup as a fraction must be in [0, 1), got {warmup}; give an int for a step count")
        if isinstance(warmup, int) and warmup < 0:
            raise ConfigError(f"warmup must be >= 0 steps, got {warmup}")
        if not 0 <= min_lr <= learning_rate:
            raise ConfigError(f"min_lr ({min_lr}) must be between 0 and learning_rate ({learning_rate})")
        self.save_hyperparameters()
        self.config = GPTConfig(
            vocab_size=vocab_size,
            block_size=block_size,
            embed_dim=embed_dim,
            n_heads=n_heads,
            n_layers=n_layers,
            dropout=dropout,
            use_rope=use_rope,
            norm_type=norm_type,
            bias=bias,
            rope_base=rope_base,
        )
        self.model = GPT(self.config)
        # Compiled as a function, so that the module tree and checkpoint keys stay those of the plain model.
        self._loss = torch.compile(self.model.loss) if compile else self.model.loss
        self.tokenizer: Tokenizer | None = None  # from the data module, or from a checkpoint
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.flops_per_batch = 0  # of the latest training batch, over all processes: for ThroughputMonitor
        self._seed = torch.initial_seed()  # set again when fitting starts

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    # Data hand-over ----------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None) if datamodule is not None else None
        if tokenizer is None:
            return
        if tokenizer.vocab_size > self.config.vocab_size:
            raise UsageError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {self.config.vocab_size}; "
                "set data.vocab_size to at least the tokenizer's size, or use the tokenizer the model was "
                "trained with"
            )
        self.tokenizer = tokenizer

    # Steps ---------------------------------------------------------------------------------------------

    def model_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy of a batch (x, y), each (B, T)."""
        x, y = batch
        return self._loss(x, y)

    def on_fit_start(self) -> None:
        self._seed = torch.initial_seed()  # seed_everything's seed, the same in every rank and after a resume

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Dropout draws from the global torch RNG. Seeding it from (seed, epoch, batch, rank) before every batch
        # makes the masks a pure function of the position in training, as the data order is: a resumed run draws
        # the masks an uninterrupted run would have drawn. Saving the RNG state in the checkpoint would not do:
        # every DataLoader iterator also draws from it, and a resumed run creates its iterators at other points
        # (sanity check, mid-epoch start). Ranks draw different masks.
        entropy = [self._seed, self.current_epoch, batch_idx, self.global_rank]
        torch.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.model_step(batch)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at step {self.global_step}; lower model.learning_rate or "
                "use trainer.precision 32-true, then resume with --ckpt_path last (the last good checkpoint)"
            )
        self.log("train/loss", loss, prog_bar=True)
        x = batch[0]  # (B, T)
        self.flops_per_batch = self.model.flops_per_token(x.size(1)) * x.numel() * self.trainer.world_size
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self.val_loss.update(self.model_step(batch))

    def test_step(self, batch, batch_idx: int) -> None:
        self.test_loss.update(self.model_step(batch))

    def _log_eval_metrics(self, split: str, metric: MeanMetric) -> None:
        loss = metric.compute()  # already the mean over all ranks: torchmetrics syncs in compute()
        metric.reset()
        # sync_dist averages values that are equal on every rank; it keeps Lightning from warning under DDP.
        self.log(f"{split}/loss", loss, prog_bar=split == "val", sync_dist=True)
        self.log(f"{split}/ppl", loss.exp(), sync_dist=True)
        bytes_per_token = getattr(getattr(self.trainer, "datamodule", None), "bytes_per_token", None)
        if bytes_per_token:
            # nats per token -> bits per byte of text: independent of the tokenizer, so runs compare.
            self.log(f"{split}/bpb", loss / (bytes_per_token * math.log(2)), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_eval_metrics("val", self.val_loss)

    def on_test_epoch_end(self) -> None:
        self._log_eval_metrics("test", self.test_loss)

    # Optimizer and schedule --------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # fp16 loss scaling unscales inside a fused step, after Lightning would clip: no fused kernel there.
        fused = self.trainer.precision != "16-mixed"
        optimizer = build_optimizer(self.model, hp.learning_rate, hp.weight_decay, tuple(hp.betas), fused)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        # "name": LearningRateMonitor logs each parameter group's rate as train/lr/<group>.
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
        }

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if not gradient_clip_val:
            return
        if self.trainer.precision == "16-mixed":  # fp16's loss scaler unscales first: Lightning's own path
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        # Lightning's mixed-precision plugin refuses to clip for a fused optimizer (a guard meant for fp16 loss
        # scaling) and its FSDP plugin refuses to clip by norm; bf16 and fp32 gradients are true gradients.
        if gradient_clip_algorithm == "value":  # elementwise: each process clips its own (shard of the) grads
            torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)
        elif isinstance(self.trainer.strategy, FSDPStrategy):
            # Each process holds a shard of the gradients: the root FSDP module clips by their global norm.
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)

    def _total_steps(self) -> int | None:
        """Optimizer steps in the whole run, or None while the trainer cannot know them yet."""
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        batches = trainer.num_training_batches
        if trainer.max_epochs is None or trainer.max_epochs < 0 or not math.isfinite(batches):
            return None
        return math.ceil(batches / trainer.accumulate_grad_batches) * trainer.max_epochs

    def _lr_factor(self, step: int) -> float:
        total = self._total_steps()
        warmup = self.hparams.warmup
        if total is None:  # epoch-based run before its data is set up: on_train_start sets the lr again
            return 1.0 / (warmup + 1) if isinstance(warmup, int) and warmup > 0 else 0.0
        warmup_steps = round(warmup * total) if isinstance(warmup, float) else warmup
        min_ratio = self.hparams.min_lr / self.hparams.learning_rate
        return lr_factor(step, warmup_steps, total, min_ratio)

    def on_train_start(self) -> None:
        if self._total_steps() is None:
            raise UsageError("set trainer.max_steps (or trainer.max_epochs with a finite dataset) to schedule the lr")
        # The run's length is known now (also after a resume): set the current lr from it.
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            factor = self._lr_factor(scheduler.last_epoch)
            for group, base_lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
                group["lr"] = base_lr * factor

    # Checkpoints: the tokenizer and the model config travel inside ------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["gptlit"] = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "tokenizer": self.tokenizer.to_str() if self.tokenizer is not None else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning loads the weights right after this hook: say what differs before a size mismatch does.
        saved = checkpoint.get("gptlit") or {}
        for name, value in (saved.get("config") or {}).items():
            mine = getattr(self.config, name, value)
            if mine != value:
                raise UsageError(
                    f"the checkpoint holds a model with {name}={value}, this model has {name}={mine}; "
                    "resume with the run's own config (python -m gptlit fit --ckpt_path last)"
                )
        if not saved.get("tokenizer"):
            return
        tokenizer = Tokenizer.from_str(saved["tokenizer"])
        if self.tokenizer is None:
            self.tokenizer = tokenizer
        elif self.tokenizer.sha256 != tokenizer.sha256:  # the data module's: its token ids mean other text
            trainer = getattr(self, "_trainer", None)
            data = getattr(getattr(trainer, "datamodule", None), "tokenizer_file", "the data module's tokenizer")
            checkpoint_path = getattr(trainer, "ckpt_path", None) or "the checkpoint"
            raise UsageError(
                f"{checkpoint_path} was trained with another tokenizer than {data}; resume with the data.data_dir "
                "(or data.tokenizer_path) the run was trained with, or start a new run"
            )
