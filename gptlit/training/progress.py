"""What a run shows in the terminal: its progress in optimizer steps, and a summary of its model."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count
from rich import get_console
from rich.table import Table

# ThroughputMonitor's tokens per second, of all processes (logged with more than one) or of this one.
TOKENS_PER_SEC = ("train/items_per_sec", "train/device/items_per_sec")


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, counting the optimizer steps of the whole run rather than an epoch's batches.

    ``Step 120/260``, the time elapsed and left, then the training loss, the last validation's loss and bits per
    byte, and tokens per second (Lightning's ``ThroughputMonitor``, once it has a window of batches). A resumed
    run goes on from the step it resumed at. Validation keeps Lightning's bar.
    """

    def configure_columns(self, trainer: L.Trainer) -> list:
        description, bar, count, *rest = super().configure_columns(trainer)
        return [description, count, bar, *rest]  # "Step 120/260 ━━━━"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # One bar for the whole run, not one an epoch.
        if self.is_enabled and self.progress is not None and self.train_progress_bar_id is None:
            self.train_progress_bar_id = self.progress.add_task(
                "Step", total=trainer.estimated_stepping_batches, completed=trainer.global_step
            )
            self.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self.train_progress_bar_id is None:
            self.on_train_epoch_start(trainer, pl_module)
        # Lightning's bar shows batch_idx + 1 done: here, the optimizer steps done.
        super().on_train_batch_end(trainer, pl_module, outputs, batch, trainer.global_step - 1)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the run's name, cut to its last 4 characters
        if "val/bpb" in trainer.callback_metrics:
            metrics["val/bpb"] = trainer.callback_metrics["val/bpb"].item()
        tokens = next((trainer.logged_metrics[k] for k in TOKENS_PER_SEC if k in trainer.logged_metrics), None)
        if tokens is not None:
            metrics["tokens/s"] = f"{float(tokens):,.0f}"
        return metrics


class ParameterSummary(RichModelSummary):
    """Lightning's model summary, without its FLOPs when it has counted none (it counts them only for a module
    with an ``example_input_array``; gptlit's has none): a column of zeros otherwise."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        if total_flops:
            RichModelSummary.summarize(
                summary_data,
                total_parameters,
                trainable_parameters,
                model_size,
                total_training_modes,
                total_flops,
                **summarize_kwargs,
            )
            return
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        for name, _ in columns:
            table.add_column(name, justify="right" if name.startswith("Params") else "left")
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        frozen = total_parameters - trainable_parameters
        of_which = f" ({get_human_readable_count(frozen).strip()} frozen)" if frozen else ""
        size = get_formatted_model_size(model_size)
        console.print(f"Parameters: {get_human_readable_count(total_parameters).strip()}{of_which}, {size} MB")
