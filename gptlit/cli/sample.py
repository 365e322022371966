"""``python -m gptlit sample``: stories from a checkpoint, streamed to the terminal as they are written."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from tokenizers.decoders import DecodeStream

from gptlit.data.tokenizer import Tokenizer
from gptlit.errors import GptlitError, UsageError
from gptlit.generation.decoding import SamplingOptions, check_sampling_options
from gptlit.generation.draft import NgramTable
from gptlit.generation.generate import generate
from gptlit.model.gpt import GPT
from gptlit.training.runs import find_checkpoint, load_model, run_data_dir


class TextStream:
    """Prints a story's text as its tokens arrive, decoding each token once (``tokenizers``' ``DecodeStream``).

    A character whose UTF-8 bytes span several tokens is printed once its last token has come.
    """

    def __init__(self, tokenizer: Tokenizer, out=None) -> None:
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.decoder = DecodeStream(skip_special_tokens=True)
        self.printed = 0  # characters written so far

    def __call__(self, row: int, token: int) -> None:
        chunk = self.decoder.step(self.tokenizer.hf, token)
        if chunk:
            self.out.write(chunk)
            self.out.flush()
            self.printed += len(chunk)

    def finish(self, ids: list[int]) -> None:
        """Write what the stream still holds back (an incomplete character at the very end), and a newline."""
        self.out.write(self.tokenizer.decode(ids)[self.printed :] + "\n")


def write_story(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    options: SamplingOptions,
    out=None,
    draft_table: NgramTable | None = None,
) -> int:
    """Stream one continuation of ``prompt`` to ``out`` (default stdout), ended by the tokenizer's ``<eos>``;
    returns the number of new tokens. ``draft_table`` goes to `gptlit.generation.generate.generate`."""
    out = out or sys.stdout
    out.write(prompt)
    stream = TextStream(tokenizer, out)
    ids, eos_id = tokenizer.encode(prompt, bos=True), tokenizer.eos_id
    (new_ids,) = generate(model, ids, eos_id=eos_id, on_token=stream, draft_table=draft_table, options=options)
    stream.finish(new_ids)
    return len(new_ids)


def sample(
    ckpt_path: str = "last",
    prompt: str = "Once upon a time",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 40,
    top_p: float | None = 0.95,
    seed: int | None = None,
    num_samples: int = 1,
    interactive: bool = False,
    device: str = "auto",
    run_name: str | None = None,
    root_dir: str = ".",
    draft_data: str | None = "auto",
    draft_tokens: int = 8,
    compile: bool = False,
) -> None:
    """Write stories with a trained model.

    Args:
        ckpt_path: A ``.ckpt`` file, or ``last`` / ``best`` of a run (the most recent run unless --run_name).
        prompt: The story's beginning; an empty prompt starts from ``<bos>``.
        max_new_tokens: Tokens to write per story, fewer if the model ends the story (``<eos>``).
        temperature: Softmax temperature; 0 is greedy.
        top_k: Sample among the k most likely tokens only.
        top_p: Sample among the most likely tokens holding top_p of the probability only.
        seed: Seed for reproducible stories (sample i uses seed + i).
        num_samples: Stories to write.
        interactive: Read prompts from the terminal until ``quit``, end of input or Ctrl-C.
        device: ``cpu``, ``cuda``, ``cuda:1``... or ``auto`` (a GPU when there is one).
        run_name: The run whose ``last``/``best`` checkpoint to use.
        root_dir: The directory holding ``lightning_logs/``.
        draft_data: A prepared data directory of the model's tokenizer, whose training tokens' n-grams decoding
            also guesses from, confirming more tokens per forward pass: the same story, sooner. ``auto``: the
            directory the checkpoint's run trained on (``data.data_dir`` of its config.yaml), when it is there and
            holds the model's tokens; ``none``: guesses from the story's own text only.
        draft_tokens: Guessed tokens checked with each token, in one forward pass; 0 feeds one token at a time.
            The same story either way.
        compile: Compile the forward passes with ``torch.compile``: a wait before the first story, faster after.
    """
    options = SamplingOptions(max_new_tokens, temperature, top_k, top_p, seed, draft_tokens, compile)
    check_sampling_options(num_samples=num_samples, seed=seed)  # story i uses seed + i
    if not interactive:
        check_prompt(prompt)
    device = _device(device)
    path = find_checkpoint(ckpt_path, root_dir, run_name)
    model, tokenizer = load_model(path, device)
    draft_table = read_draft_table(draft_data, path, tokenizer)
    if compile:  # compile before the first story, so that its speed is the decoding's
        compile_decoding(model, tokenizer, options)

    def write(text: str) -> None:
        check_prompt(text)
        write_stories(model, tokenizer, text, num_samples, device, options, draft_table)

    if interactive:
        print(f"{path}: type a story's beginning; 'quit' or Ctrl-D ends.", file=sys.stderr)
        read_prompts(write)
    else:
        write(prompt)


def read_draft_table(draft_data: str | None, checkpoint: Path, tokenizer: Tokenizer) -> NgramTable | None:
    """The n-gram table of ``--draft_data`` (see `sample`): a named directory that cannot serve is an error; with
    ``auto``, a run's directory that is gone, or now holds another tokenizer's tokens, gives no table."""
    if draft_data is None or draft_data == "none":
        return None
    if draft_data != "auto":
        return NgramTable.from_data_dir(draft_data, tokenizer_sha256=tokenizer.sha256)
    data_dir = run_data_dir(checkpoint)
    try:
        return None if data_dir is None else NgramTable.from_data_dir(data_dir, tokenizer_sha256=tokenizer.sha256)
    except GptlitError:
        return None


def compile_decoding(model: GPT, tokenizer: Tokenizer, options: SamplingOptions) -> None:
    """Run a short decoding with ``options``' compile setting, which compiles the forward passes, and say how long
    it took."""
    start = time.perf_counter()
    warm_up = replace(options, max_new_tokens=2, temperature=0, draft_tokens=0)
    generate(model, tokenizer.encode("Once upon a time", bos=True), options=warm_up)
    print(f"[compiled in {time.perf_counter() - start:.1f} s]", file=sys.stderr)


def check_prompt(prompt: str) -> None:
    """Refuse a prompt that is not text (bytes that were not UTF-8 come in as lone surrogates)."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        raise UsageError(f"the prompt is not valid UTF-8 text (at character {err.start + 1}); type it again") from None


def _device(name: str) -> str:
    """``--device``, checked: a device this torch can use."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device; use cpu, cuda, cuda:1 ... or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this torch sees no CUDA device; use --device cpu")
    return name


def write_stories(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    count: int,
    device: str,
    options: SamplingOptions,
    draft_table: NgramTable | None = None,
) -> None:
    """Stream ``count`` continuations of ``prompt`` to stdout (story i with the options' seed + i), then the
    speed to stderr."""
    start, tokens = time.perf_counter(), 0
    for i in range(count):
        if count > 1:
            print(f"--- sample {i + 1} ---")
        story = options if options.seed is None else replace(options, seed=options.seed + i)
        tokens += write_story(model, tokenizer, prompt, story, draft_table=draft_table)
    elapsed = time.perf_counter() - start
    drafts = "" if draft_table is None else f", n-grams of {draft_table.source}"
    print(f"[{tokens} tokens in {elapsed:.2f} s, {tokens / elapsed:.1f} tokens/s on {device}{drafts}]", file=sys.stderr)


def read_prompts(write: Callable[[str], None]) -> None:
    """Call ``write`` with each line typed, until ``quit``, end of input or Ctrl-C; Ctrl-C while writing stops
    only that story, and a line that cannot be a prompt is reported and the session goes on."""
    while True:
        try:
            text = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        except UnicodeDecodeError as err:  # bytes that are not UTF-8, read strictly
            print(f"gptlit: error: that line is not valid UTF-8 text ({err.reason}); type it again", file=sys.stderr)
            continue
        if text.strip() == "quit":
            return
        try:
            write(text)
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)
        except GptlitError as err:
            print(f"gptlit: error: {err}", file=sys.stderr)
