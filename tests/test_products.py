"""The matrix products of a decoding pass (gptlit.model.products): each form equal to F.linear up to rounding, the
fastest tried in the first passes of each row count and kept, F.linear wherever nothing is measured."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptlit.model import products as products_module
from gptlit.model.products import FORMS, MOST_ROWS, Products


def layers(bias: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0) -> list:
    """Three linear layers of a tiny pass: (48, 16), (16, 16) and (16, 48)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(48, 16), (16, 16), (16, 48)]
    return [
        (torch.randn(n, k, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype) if bias else None)
        for n, k in shapes
    ]


def run_pass(products: Products, rows: int) -> None:
    """A pass's products: each layer once, in order, on ``rows`` rows."""
    for index, (w, _) in enumerate(products.layers):
        products.layer(index)(torch.randn(1, rows, w.size(1)))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """Products take the time set here for their form (seconds; a form's first product may cost more), on a clock
    of their own; and the products already measured are forgotten."""
    monkeypatch.setattr(products_module, "_TRIALS", {})
    costs = {"linear": 3.0, "transposed": 1.0, "weight-first": 2.0, "first": 0.0, "now": 0.0}
    seen: set[str] = set()
    product = Products.product

    def timed(self, form, index, x):
        costs["now"] += costs[form] + (costs["first"] if form not in seen else 0.0)
        seen.add(form)
        return product(self, form, index, x)

    monkeypatch.setattr(Products, "product", timed)
    monkeypatch.setattr(products_module, "perf_counter", lambda: costs["now"])
    return costs


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (2, 1), (1, 9)])
def test_each_form_is_linear_up_to_rounding(form, bias, shape):
    products = Products(layers(bias), form)
    for index, (w, b) in enumerate(products.layers):
        x = torch.randn(*shape, w.size(1))
        out = products.layer(index)(x)
        assert out.shape == (*shape, w.size(0))
        torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_the_fastest_form_is_tried_in_the_first_passes_then_kept(clock):
    clock["first"] = 100.0  # a kernel's first call, and the transposition: not counted
    products = Products(layers())
    for _ in range(5):
        run_pass(products, 1)
        assert products.form(1) is None  # each form warms up in a pass, then is timed in one
    run_pass(products, 1)
    assert products.form(1) == "transposed" and products.form(2) is None
    clock["linear"] = 0.1  # later passes do not measure again
    run_pass(products, 1)
    assert products.form(1) == "transposed"


def test_the_forms_are_tried_once_per_architecture_and_row_count(clock):
    first, second = Products(layers(seed=1)), Products(layers(seed=2))  # two decodings of one architecture
    for products in (first, second, first, second, first, second):
        run_pass(products, 2)
    assert first.form(2) == second.form(2) == "transposed"
    assert Products(layers(bias=False)).form(2) is None  # another architecture: tried apart
    clock["weight-first"] = 0.5
    other = Products(layers(bias=False))
    for _ in range(6):
        run_pass(other, 2)
    assert other.form(2) == "weight-first"


def test_prefills_and_unmeasured_models_multiply_by_linear(clock):
    products = Products(layers())
    run_pass(products, MOST_ROWS + 1)
    assert products.form(MOST_ROWS + 1) == "linear" and products_module._TRIALS[products.key] == {}
    assert Products(layers(), "linear").form(1) == "linear"
    assert Products(layers(dtype=torch.bfloat16)).form(1) == "linear"
    assert Products(layers(), "weight-first").form(1) == "weight-first"
    with pytest.raises(ValueError, match="form must be 'fastest' or one of"):
        Products(layers(), "fast")


def test_the_transposed_weights_are_made_once_per_decoding():
    products = Products(layers())
    first = products.transposed()
    assert products.transposed() is first
    for (w, _), wt in zip(products.layers, first, strict=True):
        assert torch.equal(wt, w.t()) and wt.is_contiguous()
