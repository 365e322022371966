"""GPTLitModule: the LightningModule that trains a GPT — loss, metrics, AdamW and its schedule."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torchmetrics import MeanMetric

from gptlit.checkpoint import CHECKPOINT_FORMAT, check_same_shape, migrate_checkpoint, read_checkpoint
from gptlit.data.tokenizer import Tokenizer, check_same_tokenizer
from gptlit.errors import ConfigError, NonFiniteLossError, UsageError
from gptlit.model.config import GPTConfig
from gptlit.model.gpt import GPT
from gptlit.training.optim import (
    MuonAdjustLR,
    OptimizerName,
    ScheduleName,
    build_adamw,
    build_muon,
    check_choice,
    count_warmup_steps,
    schedule,
    wsd_decay_start,
)

if TYPE_CHECKING:
    from gptlit.training.budget import BudgetPlan

# The settings a resumed run may change, each with the parameter-group keys it sets ("lr": the peak rate).
# The schedule's shape (min_lr, warmup, schedule, decay_fraction) is read anew at every step.
RESUMABLE = {
    "learning_rate": ("lr",),
    "muon_lr": ("lr",),
    "weight_decay": ("weight_decay",),
    "muon_weight_decay": ("weight_decay",),
    "betas": ("betas",),
    "muon_momentum": ("momentum",),
    "muon_adjust_lr": ("adjust_lr_fn",),
    "min_lr": (),
    "warmup": (),
    "schedule": (),
    "decay_fraction": (),
}


class GPTLitModule(L.LightningModule):
    """Trains a GPT on next-token prediction.

    Args:
        config: The model's shape and variant (``model.config.*``; its vocab_size comes from data.vocab_size).
        learning_rate: Peak learning rate, reached at the end of warmup.
        min_lr: Learning rate at the end of the schedule's decay (cosine or wsd).
        weight_decay: AdamW weight decay, applied to the weight matrices of linear layers only; with
            ``optimizer: muon``, to an untied head only (the blocks' matrices take ``muon_weight_decay``).
        betas: AdamW betas.
        warmup: Warmup length: a float below 1 is a fraction of all optimizer steps (with ``trainer.max_time``:
            of the time budget), an int a step count.
        optimizer: ``adamw``, or ``muon``: Muon for the transformer blocks' weight matrices and AdamW (at
            learning_rate) for the embeddings, the head, norms and biases.
        schedule: ``cosine`` (warmup, then cosine to min_lr) or ``wsd`` (warmup, the peak rate, then a linear
            decay to min_lr over the last decay_fraction of the steps; the state before the decay is saved as
            ``checkpoints/stable.ckpt``, which ``--ckpt_path stable --trainer.max_steps N`` extends to N steps).
            The rates and these settings may be changed on resume; they apply from the resumed step.
        decay_fraction: The share of all steps that ``wsd`` decays over (with ``trainer.max_time``: of the
            budget; the schedule is planned over the time, see `gptlit.training.budget`).
        muon_lr: Muon's peak learning rate.
        muon_momentum: Muon's (Nesterov) momentum.
        muon_weight_decay: Muon's decoupled weight decay.
        muon_adjust_lr: How Muon scales its update by matrix shape: ``original`` (Keller Jordan's:
            sqrt(max(1, rows/cols))) or ``match_rms_adamw`` (Moonshot's: the RMS of an AdamW update, so that
            AdamW's learning rate and weight decay carry over).
        compile: Compile the model and its loss with ``torch.compile``: the first steps wait for the
            compilation, the later ones run faster (benchmarks/README.md measures both). Needs a C++ compiler
            on a CPU.
    """

    def __init__(
        self,
        config: GPTConfig = GPTConfig(),
        learning_rate: float = 6e-4,
        min_lr: float = 6e-5,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup: int | float = 0.1,
        optimizer: OptimizerName = "adamw",
        schedule: ScheduleName = "cosine",
        decay_fraction: float = 0.2,
        muon_lr: float = 0.02,
        muon_momentum: float = 0.95,
        muon_weight_decay: float = 0.0,
        muon_adjust_lr: MuonAdjustLR = "original",
        compile: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(warmup, float) and not 0.0 <= warmup < 1.0:
            raise ConfigError(f"warmup as a fraction must be in [0, 1), got {warmup}; give an int for a step count")
        if isinstance(warmup, int) and warmup < 0:
            raise ConfigError(f"warmup must be >= 0 steps, got {warmup}")
        if not 0 <= min_lr <= learning_rate:
            raise ConfigError(f"min_lr ({min_lr}) must be between 0 and learning_rate ({learning_rate})")
        if not 0.0 < decay_fraction <= 1.0:
            raise ConfigError(f"decay_fraction must be in (0, 1], got {decay_fraction}")
        check_choice("model.optimizer", optimizer, OptimizerName)
        check_choice("model.schedule", schedule, ScheduleName)
        check_choice("model.muon_adjust_lr", muon_adjust_lr, MuonAdjustLR)
        self.save_hyperparameters(ignore=["config"])
        self.hparams["config"] = config.to_dict()  # plain values: a checkpoint stays loadable weights-only
        self.config = config
        self.model = GPT(self.config)
        # Compiled as a function, so that the module tree and checkpoint keys stay those of the plain model.
        self._loss = torch.compile(self.model.loss) if compile else self.model.loss
        self.tokenizer: Tokenizer | None = None  # from the data module, or from a checkpoint
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.flops_per_batch = 0  # of this process's latest training batch: for ThroughputMonitor
        self._seed = torch.initial_seed()  # set again when fitting starts
        self.budget_plan: BudgetPlan | None = None  # a schedule planned over trainer.max_time (TimeBudget)
        self._built_groups: list[dict[str, Any]] = []  # the optimizer's group settings, as configured
        self._resumed_from: dict[str, Any] | None = None  # a resumed checkpoint's settings and length

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: str | Path, map_location: str | torch.device | None = None, **kwargs: Any
    ) -> GPTLitModule:
        """The module a gptlit checkpoint holds, with its tokenizer: read weights-only (a pickle that would run
        code is refused), from the checkpoint format of any gptlit version. ``kwargs`` override its settings."""
        checkpoint = read_checkpoint(checkpoint_path)
        settings = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
        settings["config"] = GPTConfig(**checkpoint["gptlit"]["config"])
        module = cls(**{**settings, **kwargs})
        module.on_load_checkpoint(checkpoint)  # the tokenizer
        module.load_state_dict(checkpoint["state_dict"])
        return module.to(map_location) if map_location is not None else module

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
            rates = "model.learning_rate" + (" and model.muon_lr" if self.hparams.optimizer == "muon" else "")
            raise NonFiniteLossError(  # its message ends with the checkpoint to resume from
                f"training loss is {loss.item()} at step {self.global_step}; lower {rates} or use "
                "trainer.precision 32-true"
            )
        self.log("train/loss", loss, prog_bar=True)
        x = batch[0]  # (B, T)
        self.flops_per_batch = self.model.flops_per_token(x.size(1)) * x.numel()  # Lightning sums the processes
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
        betas = tuple(hp.betas)
        if hp.optimizer == "muon":
            if isinstance(self.trainer.strategy, FSDPStrategy):
                raise ConfigError("optimizer muon needs whole weight matrices, which FSDP shards: use DDP, or adamw")
            muon = dict(muon_lr=hp.muon_lr, muon_momentum=hp.muon_momentum, muon_weight_decay=hp.muon_weight_decay)
            optimizer = build_muon(self.model, hp.learning_rate, hp.weight_decay, betas, **muon,
                                   muon_adjust_lr=hp.muon_adjust_lr, fused=fused)  # fmt: skip
        else:
            optimizer = build_adamw(self.model, hp.learning_rate, hp.weight_decay, betas, fused)
        self._built_groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
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
        if self.budget_plan is not None:
            return self.budget_plan.lr_factor(step)
        total = self._total_steps()
        warmup = self.hparams.warmup
        if total is None:  # epoch-based run before its data is set up: on_train_start sets the lr again
            return 1.0 / (warmup + 1) if isinstance(warmup, int) and warmup > 0 else 0.0
        min_ratio = self.hparams.min_lr / self.hparams.learning_rate
        lr_schedule = schedule(self.hparams.schedule, self.hparams.decay_fraction)
        return lr_schedule(step, count_warmup_steps(warmup, total), total, min_ratio)

    def decay_start(self) -> int | None:
        """The first optimizer step of the WSD schedule's decay (the first below the peak rate after warmup); None
        for the cosine schedule, or while the run's length is not known (a time budget's: until its plan is frozen)."""
        if self.budget_plan is not None:
            return self.budget_plan.decay_start if self.hparams.schedule == "wsd" else None
        total = self._total_steps()
        if self.hparams.schedule != "wsd" or total is None:
            return None
        return wsd_decay_start(count_warmup_steps(self.hparams.warmup, total), total, self.hparams.decay_fraction)

    def on_train_start(self) -> None:
        if self._total_steps() is None and self.budget_plan is None:
            raise UsageError(
                "set trainer.max_steps or trainer.max_time (or trainer.max_epochs with a finite dataset) "
                "to schedule the lr"
            )
        self._take_changed_settings()
        # The run's length is known now (also after a resume): set the current lr from it.
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            factor = self._lr_factor(scheduler.last_epoch)
            for group, base_lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
                group["lr"] = base_lr * factor

    def _take_changed_settings(self) -> None:
        """After a resume, the settings given anew take effect from the resumed step, and rank 0 says which.

        Lightning restores each parameter group's settings and the schedule's peak rates from the checkpoint.
        For each setting of `RESUMABLE` that differs from the checkpoint's (a lower learning_rate after a loss
        spike), its group keys are set as this module's configuration builds them; settings left alone stay as
        restored, so a resume that changes nothing goes on exactly.
        """
        resumed, self._resumed_from = self._resumed_from, None
        if resumed is None or self.trainer.ckpt_path is None:
            return
        saved, mine = resumed["hparams"], self.hparams
        changes = {n: (saved[n], mine[n]) for n in RESUMABLE if n in saved and _shown(saved[n]) != _shown(mine[n])}
        keys = {key for name in changes for key in RESUMABLE[name]}
        for config in self.trainer.lr_scheduler_configs if keys else []:
            scheduler = config.scheduler
            for group, built in zip(scheduler.optimizer.param_groups, self._built_groups, strict=True):
                for key in keys & built.keys():
                    group["initial_lr" if key == "lr" else key] = built[key]
            scheduler.base_lrs = [group["initial_lr"] for group in scheduler.optimizer.param_groups]
        planned = self.budget_plan is not None  # a time budget lays out its own length
        # cosine: laid over the new length
        if not planned and resumed["total_steps"] not in (None, self._total_steps()):
            changes["max_steps"] = (resumed["total_steps"], self._total_steps())
        if changes and self.trainer.is_global_zero:
            changed = ", ".join(f"{name} {_shown(old)} → {_shown(new)}" for name, (old, new) in changes.items())
            print(f"gptlit: {changed} from step {self.trainer.global_step}", file=sys.stderr)

    # Checkpoints: the tokenizer and the model config travel inside ------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = self._trainer
        metrics = trainer.callback_metrics if trainer is not None else {}
        checkpoint["gptlit"] = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "tokenizer": self.tokenizer.to_str() if self.tokenizer is not None else None,
            # The latest validation's figures, for the exported model card.
            "metrics": {name: float(value) for name, value in metrics.items() if name.startswith("val/")},
            # The run's length, against which a resume with another max_steps is checked.
            "total_steps": self._total_steps() if trainer is not None else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning loads the weights right after this hook: say what differs before a size mismatch does.
        if "gptlit" in checkpoint:
            migrate_checkpoint(checkpoint)
        saved = checkpoint.get("gptlit") or {}
        self._resumed_from = {
            "hparams": dict(checkpoint.get("hyper_parameters") or {}),
            "total_steps": saved.get("total_steps"),
        }
        trainer = getattr(self, "_trainer", None)
        checkpoint_path = getattr(trainer, "ckpt_path", None) or "the checkpoint"
        if saved:
            check_same_shape(checkpoint, self.config.to_dict(), checkpoint_path)
        if not saved.get("tokenizer"):
            return
        tokenizer = Tokenizer.from_str(saved["tokenizer"])
        if self.tokenizer is None:
            self.tokenizer = tokenizer
            return
        data = getattr(getattr(trainer, "datamodule", None), "tokenizer_file", "the data module's tokenizer")
        check_same_tokenizer(  # the data module's: token ids of another tokenizer mean other text
            tokenizer.sha256,
            self.tokenizer,
            f"{checkpoint_path} was trained with another tokenizer than {data}; resume with the data.data_dir "
            "(or data.tokenizer_path) the run was trained with, or start a new run",
        )


def _shown(value: Any) -> Any:
    """A setting as it is compared and shown: a list (from a YAML file or checkpoint) as a tuple."""
    return tuple(value) if isinstance(value, list) else value
