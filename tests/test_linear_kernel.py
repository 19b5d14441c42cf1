"""The C float32 linear product on panel-packed weights (engine/linear_kernel.py): the product in
float64 within float32 rounding, batch-invariant, and the weight back bit for bit."""

import pytest
import torch

from kvlib.engine import fused, linear_kernel

needs_kernel = pytest.mark.skipif(linear_kernel.status() != "compiled",
                                  reason=f"linear kernel unavailable here: {linear_kernel.status()}")


def weight_and_rows(n, k, m, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05, torch.randn(m, k, generator=g), torch.randn(n, generator=g)


@needs_kernel
# n 40: two full panels and one of 8 columns; m 25: five tiles of five rows; 200: three row blocks
@pytest.mark.parametrize("n, k, m", [(40, 24, 1), (40, 24, 25), (576, 576, 7), (64, 33, 200)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_product_equals_float64_and_the_weight_comes_back(n, k, m, with_bias):
    weight, x, bias = weight_and_rows(n, k, m, seed=n + m)
    bias = bias if with_bias else None
    packed = linear_kernel.panels(weight)
    assert packed.shape == (n, k) and torch.equal(packed.to_dense(), weight)
    got = packed.apply(x[None], bias)  # [1, m, n], as the forward hands rows over
    expected = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    assert got.shape == (1, m, n)
    assert (got[0].double() - expected).abs().max() < 1e-5


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_row_gives_the_same_bits_whatever_rows_share_its_product(threads):
    weight, x, bias = weight_and_rows(96, 64, 130, seed=3)
    packed = linear_kernel.panels(weight)
    torch.set_num_threads(threads)
    try:
        alone = packed.apply(x[5:6], bias)
        for rows in (6, 7, 25, 97, 130):
            assert torch.equal(packed.apply(x[:rows], bias)[5], alone[0]), rows
    finally:
        torch.set_num_threads(2)


@needs_kernel
def test_fused_packs_float32_weights_as_panels_and_linear_runs_them():
    weight, x, bias = weight_and_rows(48, 32, 9, seed=4)
    packed = fused.pack(weight)
    assert isinstance(packed, linear_kernel.Panels)
    assert torch.equal(fused.linear(x, weight, bias, packed), packed.apply(x, bias))
    assert (fused.linear(x, weight, bias, packed) - torch.nn.functional.linear(x, weight, bias)).abs().max() < 1e-5


@needs_kernel
@pytest.mark.parametrize("with_bias", [False, True])
def test_a_residual_is_added_last_as_the_layer_would(with_bias):
    """linear(x, ..., residual=h) is h + linear(x, ...) bit for bit, in the kernel and in torch."""
    weight, x, bias = weight_and_rows(40, 24, 25, seed=5)
    bias = bias if with_bias else None
    h = torch.randn(1, 25, 40, generator=torch.Generator().manual_seed(6))
    packed = fused.pack(weight)
    assert torch.equal(fused.linear(x[None], weight, bias, packed, residual=h), h + packed.apply(x[None], bias))
    assert torch.equal(fused.linear(x[None], weight, bias, None, residual=h),
                       h + torch.nn.functional.linear(x[None], weight, bias))


def test_switched_off_float32_weights_go_to_onednn(monkeypatch, tmp_path):
    monkeypatch.setenv("KVLIB_LINEAR_KERNEL", "0")
    monkeypatch.setenv("KVLIB_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(linear_kernel.KERNEL, "_state", {})
    assert linear_kernel.status() == "off (KVLIB_LINEAR_KERNEL=0)"
    weight, x, _ = weight_and_rows(48, 32, 9, seed=5)
    assert not linear_kernel.takes(weight)
    if fused.can_pack(weight):
        packed = fused.pack(weight)
        assert not isinstance(packed, linear_kernel.Panels)
        assert (fused.linear(x, weight, None, packed) - x @ weight.T).abs().max() < 1e-5
