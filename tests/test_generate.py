"""Sampling: the KV-cached loop against an uncached reference, sampling filters, seeds, eos, batching."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import ARCHITECTURES, VOCAB, prompt, reference_generate, tiny_model

from gptlit.errors import UsageError
from gptlit.generation.generate import SamplingOptions, generate, generate_stream, sample_next

# KV cache against the uncached reference -----------------------------------------------------------


@ARCHITECTURES
@pytest.mark.parametrize(("length", "new"), [(1, 31), (5, 20), (17, 15), (30, 2)])
def test_cached_greedy_equals_uncached_reference(arch, length, new):
    model = tiny_model(block_size=32, **arch)
    assert length + new <= 32
    outputs = []
    for seed in range(3):
        ids = prompt(length, seed=seed)
        expected = reference_generate(model, ids, new)
        assert generate(model, ids, new, temperature=0) == [expected]
        outputs.append(expected)
    # The continuations depend on the prompt (a model stuck on one token would make this test weak).
    assert len({tuple(out) for out in outputs}) > 1


@ARCHITECTURES
@pytest.mark.parametrize(("length", "new", "block_size"), [(3, 29, 32), (5, 60, 16)])
def test_cached_sampling_equals_uncached_reference(arch, length, new, block_size):
    # Samples wander through many more contexts than greedy decoding does; the same seeded draws
    # on the same distributions give the same tokens. The second case slides the window 5 times.
    model = tiny_model(block_size=block_size, **arch)
    ids = prompt(length)
    expected = reference_generate(model, ids, new, temperature=2.0, seed=11)
    assert generate(model, ids, new, temperature=2.0, seed=11) == [expected]
    assert len(set(expected)) > 10


@ARCHITECTURES
def test_generation_beyond_block_size(arch):
    model = tiny_model(block_size=16, seed=5, **arch)
    ids = prompt(5)
    out = generate(model, ids, 50, temperature=0, eos_id=None)
    assert len(out) == 1 and len(out[0]) == 50
    assert out[0] == reference_generate(model, ids, 50)
    assert len(set(out[0][20:])) > 3  # still wandering after the window has slid


@ARCHITECTURES
def test_prompt_longer_than_block_size(arch):
    model = tiny_model(block_size=16, **arch)
    out = generate(model, prompt(40), 10, temperature=1.0, seed=0)
    assert len(out[0]) == 10 and all(0 <= t < VOCAB for t in out[0])
    assert len(generate(model, prompt(40), 30, temperature=0)[0]) == 30


@ARCHITECTURES
@pytest.mark.parametrize(
    ("block_size", "lengths", "new"),
    [
        (32, [3, 9, 1, 20], 10),  # within block_size
        (16, [3, 10, 16], 30),  # the window slides
        (16, [3, 17, 19, 21, 24, 27, 30, 34], 30),  # prompts longer than block_size, cut
    ],
)
def test_batch_of_different_lengths_equals_each_prompt_alone(arch, block_size, lengths, new):
    model = tiny_model(block_size=block_size, **arch)
    prompts = [prompt(n, seed=n) for n in lengths]
    alone = [generate(model, p, new, temperature=0)[0] for p in prompts]
    assert generate(model, prompts, new, temperature=0) == alone
    # A 2-D tensor of equal-length prompts is a batch too.
    same = torch.tensor([prompt(6, seed=1), prompt(6, seed=2)])
    assert generate(model, same, 5, temperature=0) == [generate(model, row, 5, temperature=0)[0] for row in same]


# sample_next ---------------------------------------------------------------------------------------


def samples(logits: torch.Tensor, n: int = 300, **kwargs) -> list[set[int]]:
    """The set of ids drawn in each row over n seeds."""
    drawn = [set() for _ in range(logits.size(0))]
    for seed in range(n):
        ids = sample_next(logits, generator=torch.Generator().manual_seed(seed), **kwargs)
        for row, i in zip(drawn, ids.tolist(), strict=True):
            row.add(i)
    return drawn


def test_top_k_samples_only_the_k_highest():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)  # distinct values, in no particular order
    top5 = [set(torch.topk(row, 5).indices.tolist()) for row in logits]
    # A high temperature makes all five likely, so the set drawn is exactly the top 5.
    assert samples(logits, temperature=5.0, top_k=5) == top5
    assert samples(logits, temperature=5.0, top_k=1) == [{int(row.argmax())} for row in logits]
    assert all(len(s) > 20 for s in samples(logits, temperature=5.0))  # no filter: many ids drawn


def test_top_p_samples_only_the_nucleus():
    probs = torch.tensor(
        [
            [0.05, 0.5, 0.03, 0.3, 0.12],  # ranked 1, 3, 4, 0, 2; cumulative 0.5, 0.8, 0.92, 0.97, 1
            [0.1, 0.4, 0.2, 0.25, 0.05],  # ranked 1, 3, 2, 0, 4; cumulative 0.4, 0.65, 0.85, 0.95, 1
        ]
    )
    logits = probs.log() + torch.tensor([[3.0], [-1.0]])  # a shift per row changes nothing
    assert samples(logits, top_p=0.75) == [{1, 3}, {1, 3, 2}]
    assert samples(logits, top_p=0.9) == [{1, 3, 4}, {1, 3, 2, 0}]
    assert samples(logits, top_p=0.3) == [{1}, {1}]
    assert samples(logits, top_p=1.0) == [{0, 1, 2, 3, 4}] * 2
    # top_k first, then the nucleus of what is left: row 0 keeps 1 and 3 (0.625 and 0.375 after
    # renormalising), and 1 alone holds more than 0.62; row 1's 1 (0.615) does not.
    assert samples(logits, top_p=0.62) == [{1, 3}, {1, 3}]
    assert samples(logits, top_k=2, top_p=0.62) == [{1}, {1, 3}]


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [5.0, 4.9, 0.0]])
    assert sample_next(logits, temperature=0).tolist() == [1, 0]


# Seeds ---------------------------------------------------------------------------------------------


def test_same_seed_same_sample_and_global_rng_untouched():
    model = tiny_model()
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    a = generate(model, prompt(4), 20, temperature=1.5, seed=7)
    b = generate(model, prompt(4), 20, temperature=1.5, seed=7)
    assert a == b
    assert torch.equal(torch.random.get_rng_state(), state)


def test_different_seeds_give_different_samples():
    model = tiny_model()
    runs = {tuple(generate(model, prompt(4), 20, temperature=3.0, seed=s)[0]) for s in range(4)}
    assert len(runs) == 4


def test_no_seed_uses_the_global_rng():
    model = tiny_model()
    torch.manual_seed(5)
    a = generate(model, prompt(4), 20, temperature=3.0)
    torch.manual_seed(5)
    b = generate(model, prompt(4), 20, temperature=3.0)
    c = generate(model, prompt(4), 20, temperature=3.0)
    assert a == b and a != c


# eos, callbacks, mode ------------------------------------------------------------------------------


def test_eos_stops_each_row_on_its_own():
    model = tiny_model()
    prompts = [prompt(4, seed=1), prompt(9, seed=2)]
    greedy = [generate(model, p, 20, temperature=0)[0] for p in prompts]
    eos = greedy[0][5]
    first = greedy[0].index(eos)
    assert first <= 5
    expected = [g[: g.index(eos)] if eos in g else g for g in greedy]
    out = generate(model, prompts, 20, temperature=0, eos_id=eos)
    assert out == expected
    assert len(out[0]) == first and eos not in out[0]
    # A stream yields only the rows still going.
    steps = list(generate_stream(model, prompts, 20, temperature=0, eos_id=eos))
    assert [step.get(0) for step in steps[:first]] == expected[0]
    assert all(0 not in step for step in steps[first:])


def test_eos_inside_a_longer_prompt_does_not_stop_its_row():
    # The longer prompt is still being read, token by token, while the shorter one generates.
    model = tiny_model()
    short, long = prompt(3, seed=1), prompt(10, seed=2)
    continuation = generate(model, [short, long], 8, temperature=0)
    eos = next(t for t in range(3, VOCAB) if t not in continuation[0] + continuation[1])
    long[6] = eos
    out = generate(model, [short, long], 8, temperature=0, eos_id=eos)
    assert out == generate(model, [short, long], 8, temperature=0)
    assert eos not in out[1] and len(out[1]) == 8


def test_on_token_receives_tokens_in_order():
    model = tiny_model()
    prompts = [prompt(3, seed=1), prompt(7, seed=2)]
    calls = []
    out = generate(model, prompts, 12, temperature=1.0, seed=3, on_token=lambda i, t: calls.append((i, t)))
    streamed = [(i, t) for step in generate_stream(model, prompts, 12, seed=3) for i, t in step.items()]
    assert calls == streamed
    for row in range(2):
        assert [t for i, t in calls if i == row] == out[row]
    assert len(calls) == 24


@pytest.mark.parametrize("training", [True, False])
def test_train_eval_mode_is_restored(training):
    model = tiny_model().train(training)
    generate(model, prompt(3), 5, temperature=1.0, seed=0)
    assert all(m.training == training for m in model.modules())
    assert model.kv_cache_shape is None


def test_mode_and_cache_restored_when_on_token_raises():
    model = tiny_model().train()

    def stop(i, t):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as excinfo:
        generate(model, prompt(3), 5, on_token=stop)
    # Checked while excinfo still holds the traceback, and with it generate's frame and its stream.
    assert excinfo.traceback
    assert model.training
    assert model.kv_cache_shape is None


# Seed-style GPT.generate ---------------------------------------------------------------------------


def test_seed_style_model_generate():
    model = tiny_model()
    token_ids = torch.tensor([prompt(5, seed=1), prompt(5, seed=2)])
    out = model.generate(token_ids=token_ids, max_new_tokens=7, temperature=0.8, top_k=40)
    assert out.shape == (2, 12) and out.dtype == token_ids.dtype
    assert torch.equal(out[:, :5], token_ids)
    assert ((out >= 0) & (out < VOCAB)).all()
    greedy = model.generate(token_ids[0], max_new_tokens=7, temperature=0)  # 1-D prompt
    assert greedy.shape == (1, 12)
    assert greedy[0, 5:].tolist() == generate(model, token_ids[0], 7, temperature=0)[0]
    assert model.generate(token_ids, max_new_tokens=0).shape == (2, 5)


# Bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(prompt_ids=[1, VOCAB]), "prompt_ids"),
        (dict(prompt_ids=[1, -1]), "prompt_ids"),
        (dict(prompt_ids=[]), "prompt_ids"),
        (dict(prompt_ids=[[1, 2], []]), "prompt_ids"),
        (dict(prompt_ids=torch.tensor([], dtype=torch.long)), "prompt_ids"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
        (dict(seed=2**64), "seed"),
        (dict(top_k=0), "top_k"),
        (dict(draft_tokens=-1), "draft_tokens"),
        (dict(draft_tokens=2.5), "draft_tokens"),
    ],
)
def test_bad_input_raises_naming_the_argument(kwargs, name):
    model = tiny_model()
    args = dict(prompt_ids=[1, 2, 3], max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=name):
        generate(model, **args)
    if not {"prompt_ids", "draft_tokens"} & kwargs.keys():  # the seed-style entry point checks the same arguments
        with pytest.raises(ValueError, match=name):
            model.generate(torch.tensor([[1, 2]]), **(dict(max_new_tokens=4) | kwargs))


# SamplingOptions --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(temperature=-1), "temperature must be a finite number >= 0 (0 is greedy), got -1"),
        (dict(top_p=1.5), "top_p must be a number in (0, 1], or null (no top-p), got 1.5"),
        (
            dict(seed=2**64),
            f"seed must be a 64-bit integer (sample i uses seed + i), or null (a random seed), got {2**64}",
        ),
        (dict(draft_tokens=-1), "draft_tokens must be an integer >= 0 (0 feeds one token per pass), got -1"),
        (dict(compile="yes"), "compile must be true or false, got yes"),
    ],
)
def test_sampling_options_refuse_a_bad_value_when_made(kwargs, message):
    with pytest.raises(UsageError) as raised:
        SamplingOptions(10, **kwargs)
    assert str(raised.value) == message


def test_sampling_options_are_checked_once(monkeypatch: pytest.MonkeyPatch):
    import gptlit.generation.decoding as decoding

    checks = []
    check = decoding.check_sampling_options
    monkeypatch.setattr(decoding, "check_sampling_options", lambda **values: checks.append(values) or check(**values))
    options = SamplingOptions(6, temperature=1.5, top_k=20, seed=4)
    assert len(checks) == 1
    generate(tiny_model(), [prompt(3), prompt(5)], options=options)
    assert len(checks) == 1  # generate takes the options as they are
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.temperature = -1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "keywords",
    [
        dict(temperature=1.5, top_k=20, top_p=0.9, seed=4),
        dict(temperature=0),  # drafted greedy decoding
        dict(temperature=0, draft_tokens=0),
    ],
)
def test_generate_with_options_equals_generate_with_keywords(keywords):
    model, prompts = tiny_model(), [prompt(4)]
    options = SamplingOptions(12, **keywords)
    assert generate(model, prompts, options=options) == generate(model, prompts, 12, **keywords)
    assert list(generate_stream(model, prompts, options=options)) == list(
        generate_stream(model, prompts, 12, **keywords)
    )
    ids = torch.tensor(prompts)
    assert torch.equal(model.generate(ids, options=options), model.generate(ids, 12, **keywords))


@pytest.mark.parametrize(("keywords", "name"), [(dict(max_new_tokens=5), "max_new_tokens"), (dict(top_k=3), "top_k")])
def test_generate_refuses_options_given_twice(keywords, name):
    with pytest.raises(UsageError, match=rf"^{name} is given both as an argument and in options="):
        generate(tiny_model(), prompt(3), options=SamplingOptions(4), **keywords)
    with pytest.raises(UsageError, match=r"^max_new_tokens is missing"):
        generate(tiny_model(), prompt(3))
