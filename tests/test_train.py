"""Training through the CLI: metrics, checkpoints, exact resume, schedule, accumulation, clipping, bad input."""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import MODEL, OPTIM, params, run_cli, scalars, write_config

from gptlit.data.datamodule import TinyStoriesDataModule
from gptlit.model.config import GPTConfig
from gptlit.training.module import GPTLitModule
from gptlit.training.optim import lr_factor, wsd_factor


def test_fit_trains_logs_and_checkpoints(workdir: Path) -> None:
    run_cli("fit", "--config", str(write_config(workdir, max_steps=24)))
    run = workdir / "lightning_logs" / "run"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "checkpoints" / "best.ckpt").is_file()
    assert (run / "config.yaml").is_file() and (run / "hparams.yaml").is_file()
    logged = scalars(run)
    for tag in ("train/loss", "val/loss", "val/ppl", "val/bpb", "train/lr/decay", "train/lr/no_decay"):
        assert tag in logged, tag
    # Lightning's ThroughputMonitor, over windows of 10 batches: items are tokens, 32 per sequence.
    tokens_per_sec, sequences_per_sec = logged["train/device/items_per_sec"], logged["train/device/samples_per_sec"]
    assert [step for step, _ in tokens_per_sec] == list(range(9, 24))
    assert all(
        t == pytest.approx(32 * s, rel=1e-5) for (_, t), (_, s) in zip(tokens_per_sec, sequences_per_sec, strict=True)
    )
    losses = [value for _, value in logged["train/loss"]]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5  # it learns
    val_loss, val_bpb = logged["val/loss"][-1][1], logged["val/bpb"][-1][1]
    assert val_bpb < val_loss / math.log(2)  # a token spans more than one byte
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 24  # the final step is saved even after earlier checkpoints
    assert ckpt["gptlit"]["config"]["embed_dim"] == 32 and ckpt["gptlit"]["tokenizer"]


RECIPES = {  # optimizer and schedule: each must resume exactly
    "adamw-cosine": [],
    "muon-wsd": ["--model.optimizer", "muon", "--model.schedule", "wsd", "--model.decay_fraction", "0.5"],
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_interrupted_run_resumes_to_the_same_parameters(workdir: Path, recipe: str) -> None:
    """Ctrl-C at step 7, then `fit --ckpt_path last` with no config: same weights as a run never stopped."""
    options = RECIPES[recipe]
    run_cli("fit", "--config", str(write_config(workdir, name="straight")), *options)
    config = write_config(workdir, name="cut")
    stop = '{"class_path": "probes.InterruptAt", "init_args": {"step": 7}}'
    with pytest.raises(SystemExit) as stopped:
        run_cli("fit", "--config", str(config), *options, f"--trainer.callbacks+={stop}")
    assert stopped.value.code == 130
    cut = workdir / "lightning_logs" / "cut"
    assert torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 7

    run_cli("fit", "--ckpt_path", "last")  # the most recent run: "cut"

    straight_params = params(workdir / "lightning_logs" / "straight" / "checkpoints" / "last.ckpt")
    cut_params = params(cut / "checkpoints" / "last.ckpt")
    for name, tensor in straight_params.items():
        torch.testing.assert_close(cut_params[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert sorted(p.name for p in (workdir / "lightning_logs").iterdir()) == ["cut", "straight"]
    logged = scalars(cut)
    assert [step for step, _ in logged["train/loss"]] == list(range(16))  # one curve, no step twice
    # The learning rate follows its schedule across the resume, as in the straight run.
    factor = (lambda s: wsd_factor(s, 4, 16, 0.1, 0.5)) if "wsd" in recipe else (lambda s: lr_factor(s, 4, 16, 0.1))
    expected = [OPTIM["learning_rate"] * factor(s) for s in range(16)]
    for logged_lrs in (
        logged["train/lr/no_decay"],
        scalars(workdir / "lightning_logs" / "straight")["train/lr/no_decay"],
    ):
        assert [step for step, _ in logged_lrs] == list(range(16))
        assert [value for _, value in logged_lrs] == pytest.approx(expected, rel=1e-5)


def test_the_stop_message_gives_the_command_that_resumes_the_run(workdir: Path, capsys) -> None:
    """A run under another root directory, beside a newer run there: the command printed on Ctrl-C, pasted
    as it is in the same directory, resumes that run (not the newer one) to its end."""
    stop = '{"class_path": "probes.InterruptAt", "init_args": {"step": 5}}'
    config = write_config(workdir, name="cut")
    with pytest.raises(SystemExit) as stopped:
        run_cli("fit", "--config", str(config), "--trainer.default_root_dir", "runs", f"--trainer.callbacks+={stop}")
    assert stopped.value.code == 130
    message = capsys.readouterr().err.strip().splitlines()[-1]
    found = re.fullmatch(r"gptlit: stopped at step 5, saved in last\.ckpt; resume with `(.+)`", message)
    assert found, message
    command = shlex.split(found[1])
    assert command[:4] == ["python", "-m", "gptlit", "fit"]
    run_cli(
        "fit", "--config", str(write_config(workdir, name="newer", max_steps=4)), "--trainer.default_root_dir", "runs"
    )

    run_cli(*command[3:])
    last = workdir / "runs" / "lightning_logs" / "cut" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 16


def _first_step_grads(
    batch_size: int, accumulate: int, clip: float | None = None, precision: str = "32-true", optimizer: str = "adamw"
) -> dict[str, torch.Tensor]:
    """Gradients the optimizer stepped with first (after accumulation and clipping; zeroed only later)."""
    grads: dict[str, torch.Tensor] = {}

    class Capture(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            def hook(optimizer, args, kwargs) -> None:
                if not grads:
                    grads.update({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})

            trainer.optimizers[0].register_step_post_hook(hook)

    L.seed_everything(0)
    data = TinyStoriesDataModule(
        source="stories.txt", data_dir="data", vocab_size=320, block_size=32, batch_size=batch_size
    )
    model = GPTLitModule(GPTConfig(vocab_size=data.vocab_size, **MODEL), **OPTIM, optimizer=optimizer)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=clip,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=[Capture()],
    )
    trainer.fit(model, datamodule=data)
    return grads


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_gradient_accumulation_equals_one_big_batch(workdir: Path, optimizer: str) -> None:
    accumulated = _first_step_grads(batch_size=4, accumulate=2, optimizer=optimizer)
    whole = _first_step_grads(batch_size=8, accumulate=1, optimizer=optimizer)
    assert accumulated.keys() == whole.keys() and whole
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("precision", "optimizer"), [("32-true", "adamw"), ("bf16-mixed", "adamw"), ("32-true", "muon")]
)
def test_gradient_clipping_caps_the_global_norm(workdir: Path, precision: str, optimizer: str) -> None:
    """Also under bf16-mixed, where Lightning's own clipping refuses a fused optimizer, and before Muon's step."""

    def norm(grads):
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))

    options = dict(batch_size=8, accumulate=1, precision=precision, optimizer=optimizer)
    unclipped = norm(_first_step_grads(**options))
    clipped = norm(_first_step_grads(**options, clip=0.1))
    assert unclipped > 0.2
    assert clipped == pytest.approx(0.1, rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant",
    [
        {},
        dict(mlp="relu2", qk_norm=True, tie_embeddings=False),
        dict(norm_type="rmsnorm", mlp="swiglu", n_kv_heads=1),
        dict(mlp="geglu"),
    ],
    ids=["default", "relu2-qknorm-untied", "llama-mqa", "geglu"],
)
def test_compiled_module_gives_the_same_loss_gradients_and_checkpoint_keys(variant: dict) -> None:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=101, **MODEL, **variant)
    eager, compiled = GPTLitModule(config), GPTLitModule(config, compile=True)
    compiled.load_state_dict(eager.state_dict())
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    batch = (torch.randint(0, 101, (2, 32)), torch.randint(0, 101, (2, 32)))
    losses = [module.model_step(batch) for module in (eager, compiled)]
    torch.testing.assert_close(losses[1], losses[0])
    grads = [
        torch.autograd.grad(loss, list(module.parameters()))
        for loss, module in zip(losses, (eager, compiled), strict=True)
    ]
    for ours, reference in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)
