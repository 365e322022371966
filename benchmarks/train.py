"""Training throughput: gptlit through the Lightning Trainer, the same model in a plain loop, litgpt, transformers.

    python benchmarks/train.py --config tiny --precision 32 bf16
    python benchmarks/train.py --config tiny --arch llama --precision 32   # against litgpt and transformers Llama
    python benchmarks/train.py --config small --precision bf16 --compile   # on a GPU: --device cuda (default there)

Every variant trains the same architecture on the same batches (TinyStories windows) with the same AdamW
settings, gradient clipping and precision; steady-state tokens/s is the median over interleaved rounds,
warm-up excluded. MFU is model FLOPs/s over the matmul peak measured in the same run. "autograd rope" is
gptlit's plain loop with the qkv split's gradient left to autograd (`gptlit.model.rope.split_and_rotate`) instead of
the hand-written `RotaryQKV`. On CUDA the report also says whether SDPA's flash attention kernel runs the
model, and the results go to a README section of their own, named after the card. Needs the bench extra
(`pip install -e ".[bench]"` and `pip install --no-deps litgpt`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import lightning as L
import torch
import torch.nn.functional as F
from common import interleaved, machine, markdown_table, matmul_peak, write_section

from gptlit.data.datamodule import TextDataModule
from gptlit.export.architectures import ARCHITECTURES, hf_config_dict, hf_model_type
from gptlit.model.config import GPTConfig
from gptlit.model.gpt import GPT
from gptlit.model.rope import split_and_rotate
from gptlit.training.module import GPTLitModule
from gptlit.training.optim import build_adamw

ROOT = Path(__file__).parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "tinystories-train-2mib.txt"
SHAPES = {
    "tiny": {"vocab_size": 4096, "block_size": 256, "embed_dim": 256, "n_heads": 4, "n_layers": 4},
    "small": {"vocab_size": 8000, "block_size": 256, "embed_dim": 512, "n_heads": 8, "n_layers": 6},
}
# The architectures compared: GPT-NeoX-like (gptlit's default) and Llama-like, each against its own peers.
ARCHS = {"neox": {}, "llama": {"norm_type": "rmsnorm", "mlp": "swiglu", "bias": False}}
LR, WEIGHT_DECAY, BETAS, CLIP = 1e-3, 0.1, (0.9, 0.95), 1.0


def litgpt_model(config: GPTConfig) -> torch.nn.Module:
    """litgpt's GPT of the same shape: its GPT-NeoX-like or its Llama-like configuration."""
    from litgpt.config import Config
    from litgpt.model import GPT as LitGPT

    llama = config.mlp == "swiglu"
    return LitGPT(
        Config(
            name="gptlit-shape",
            block_size=config.block_size,
            vocab_size=config.vocab_size,
            padded_vocab_size=config.vocab_size,
            n_layer=config.n_layers,
            n_head=config.n_heads,
            n_query_groups=config.kv_heads,
            n_embd=config.embed_dim,
            bias=config.bias,
            parallel_residual=False,
            rotary_percentage=1.0,
            norm_class_name="RMSNorm" if llama else "LayerNorm",
            mlp_class_name="LLaMAMLP" if llama else "GptNeoxMLP",
            intermediate_size=config.hidden_size,
        )
    )


class HFLogits(torch.nn.Module):
    """The transformers model that is exactly ``config`` (GPTNeoXForCausalLM, LlamaForCausalLM), returning
    plain logits."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        fields = {k: v for k, v in hf_config_dict(config).items() if k not in ("architectures", "model_type")}
        hf_config = AutoConfig.for_model(hf_model_type(config), **fields, attn_implementation="sdpa")
        self.model = AutoModelForCausalLM.from_config(hf_config)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx, use_cache=False).logits


def plain_loop(
    model: torch.nn.Module, batches: list, bf16: bool, steps: int, compile: bool = False, device: str = "cpu"
) -> Callable[[], float]:
    """A training loop with nothing but the work: forward, loss, backward, clip, AdamW step.

    A gptlit GPT computes its loss as GPTLitModule does (``GPT.loss``: the chunked head); the others
    produce logits for ``F.cross_entropy``.
    """
    model.to(device)
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    if isinstance(model, GPT):
        loss_fn = model.loss
    else:

        def loss_fn(x, y):
            logits = model(x)
            return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))

    if compile:
        loss_fn = torch.compile(loss_fn)
    optimizer = build_adamw(model, LR, WEIGHT_DECAY, BETAS) if isinstance(model, GPT) else None
    if optimizer is None:  # other models: the same decay rule, by parameter shape
        params = list(model.parameters())
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, fused=True)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def run() -> float:
        step(*batches[0])  # warm-up
        synchronize(device)
        start = time.perf_counter()
        for i in range(steps):
            step(*batches[(i + 1) % len(batches)])
        synchronize(device)
        return steps * batches[0][0].numel() / (time.perf_counter() - start)

    return run


def autograd_rope(run: Callable[[], float]) -> Callable[[], float]:
    """``run`` with gptlit's qkv split and rotation left to autograd (``split_and_rotate``, the inference
    path) instead of its hand-written gradient (``RotaryQKV``): what that gradient gains."""

    def patched() -> float:
        with mock.patch("gptlit.model.layers.split_heads", split_and_rotate):
            return run()

    return patched


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class StepClock(L.Callback):
    def __init__(self, device: str) -> None:
        self.ends: list[float] = []
        self.device = device

    def on_train_batch_end(self, *args) -> None:
        synchronize(self.device)
        self.ends.append(time.perf_counter())


def trainer_loop(module: GPTLitModule, data: TextDataModule, bf16: bool, steps: int, log_dir: str, device: str = "cpu"):
    """`gptlit fit` without the CLI: the Trainer, GPTLitModule's step and logging, the data module's loader."""

    def run() -> float:
        clock = StepClock(device)
        trainer = L.Trainer(
            accelerator="gpu" if device == "cuda" else "cpu",
            devices=1,
            max_steps=steps + 1,
            precision="bf16-mixed" if bf16 else "32-true",
            gradient_clip_val=CLIP,
            limit_val_batches=0,
            logger=L.pytorch.loggers.TensorBoardLogger(log_dir, name="bench"),
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            callbacks=[clock],
        )
        trainer.fit(module, datamodule=data)
        return steps * data.batch_size * data.block_size / (clock.ends[-1] - clock.ends[0])

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="neox", help="gptlit's default, or Llama-like")
    parser.add_argument("--precision", nargs="+", choices=["32", "bf16"], default=["32", "bf16"])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the gptlit model")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA device; run on a GPU machine or pass --device cpu")
    torch.manual_seed(0)
    shape = SHAPES[args.config]
    config = GPTConfig(**shape, **ARCHS[args.arch], dropout=0.0)
    peer = f"transformers {ARCHITECTURES[hf_model_type(config)].removesuffix('ForCausalLM')}"

    work = tempfile.mkdtemp(prefix="gptlit-bench-")
    data = TextDataModule(
        source=str(CORPUS),
        data_dir=f"{work}/data",
        vocab_size=shape["vocab_size"],
        block_size=shape["block_size"],
        batch_size=args.batch_size,
    )
    with contextlib.redirect_stdout(sys.stderr):
        data.prepare_data()
    data.setup("fit")
    loader = iter(data.train_dataloader())
    batches = [next(loader) for _ in range(8)]
    flops_per_token = GPT(config).flops_per_token()
    peaks = {"32": matmul_peak(torch.float32, device), "bf16": matmul_peak(torch.bfloat16, device)}

    rows, body = [], []
    for precision in args.precision:
        bf16 = precision == "bf16"
        loop = functools.partial(plain_loop, batches=batches, bf16=bf16, steps=args.steps, device=device)
        trainer = trainer_loop(GPTLitModule(config), data, bf16, args.steps, work, device)
        runners = {
            "gptlit fit (Trainer)": trainer,
            "gptlit plain loop": loop(GPT(config)),
            "gptlit plain loop, autograd rope": autograd_rope(loop(GPT(config))),
            "litgpt GPT": loop(litgpt_model(config)),
            peer: loop(HFLogits(config)),
        }
        if args.compile:
            runners["gptlit compiled"] = loop(GPT(config), compile=True)
        with contextlib.redirect_stdout(sys.stderr):
            rates = interleaved(runners, args.rounds)
        best_peer = max(rates["litgpt GPT"], rates[peer])
        for name, rate in rates.items():
            mfu = flops_per_token * rate / peaks[precision]
            rows.append(
                [
                    f"{args.config} {args.arch}",
                    precision,
                    name,
                    f"{rate:,.0f}",
                    f"{rate / best_peer:.2f}",
                    f"{100 * mfu:.1f}%",
                ]
            )
        body.append(
            f"- {args.config} {args.arch} {precision}: Trainer / plain loop = "
            f"{rates['gptlit fit (Trainer)'] / rates['gptlit plain loop']:.3f}; "
            f"gptlit plain / best peer = {rates['gptlit plain loop'] / best_peer:.3f}; RotaryQKV's gain = "
            f"{rates['gptlit plain loop'] / rates['gptlit plain loop, autograd rope']:.3f}"
        )
    table = markdown_table(["config", "precision", "variant", "tokens/s", "vs best peer", "MFU"], rows)
    peak_line = f"Matmul peaks (2048²): fp32 {peaks['32'] / 1e9:,.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:,.0f} GFLOP/s."
    report = (
        f"`python benchmarks/train.py --config {args.config} --arch {args.arch} --precision {' '.join(args.precision)}"
        f"{' --compile' if args.compile else ''}`, batch {args.batch_size} x {shape['block_size']}, "
        f"{args.rounds} interleaved rounds of {args.steps} steps (median).\n"
        f"Machine: {machine()}.\n\n{table}\n\n{peak_line}\n" + "\n".join(body)
    )
    title = f"Training throughput: {args.config}" + ("" if args.arch == "neox" else f", {args.arch}")
    if device == "cuda":
        report += f"\n- SDPA's flash attention kernel runs this model's bf16 step: {flash_attention_runs(config)}"
        title += f", {torch.cuda.get_device_name()}"
    print(report)
    if not args.no_readme:
        write_section(title, report)


def flash_attention_runs(config: GPTConfig) -> bool:
    """Whether a bf16 training step of ``config`` runs with SDPA limited to its flash attention kernel (on
    CUDA, SDPA's first choice when it can run)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = GPT(config).cuda()
    idx = torch.randint(0, config.vocab_size, (2, config.block_size), device="cuda")
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
            model.loss(idx, idx).backward()
    except RuntimeError:  # "No available kernel"
        return False
    return True


if __name__ == "__main__":
    main()
