"""The C linear products on panel-packed weights (engine/linear_kernel.py), float32 and bf16: the
product in float64 within float32 (bf16) rounding, batch-invariant, and the weight back bit for bit."""

import pytest
import torch

from kvlib.engine import fused, linear_kernel

needs_kernel = pytest.mark.skipif(linear_kernel.status() != "compiled",
                                  reason=f"linear kernel unavailable here: {linear_kernel.status()}")


needs_bf16 = pytest.mark.skipif(linear_kernel.bf16_status() != "compiled",
                                reason=f"bf16 linear kernel unavailable here: {linear_kernel.bf16_status()}")


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_row_gives_the_same_bits_whatever_rows_share_its_product(dtype, threads):
    status = linear_kernel.status() if dtype == torch.float32 else linear_kernel.bf16_status()
    if status != "compiled":
        pytest.skip(f"{dtype} linear kernel unavailable here: {status}")
    weight, x, bias = (t.to(dtype) for t in weight_and_rows(96, 64, 130, seed=3))
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


@needs_bf16
# n 40: two full panels and one of 8 columns (a pair of panels and a lone one); m 25: five tiles of
# five rows; 200: three row blocks; k 1536: SmolLM2's down projection
@pytest.mark.parametrize("n, k, m", [(40, 24, 1), (40, 24, 25), (576, 1536, 7), (64, 34, 200)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_product_is_the_float64_product_rounded_once(n, k, m, with_bias):
    weight, x, bias = (t.bfloat16() for t in weight_and_rows(n, k, m, seed=n + m))
    bias = bias if with_bias else None
    packed = linear_kernel.panels(weight)
    assert packed.shape == (n, k) and torch.equal(packed.to_dense(), weight)
    got = packed.apply(x[None], bias)
    assert got.shape == (1, m, n) and got.dtype == torch.bfloat16
    exact = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    # one rounding to bf16 (half an ulp, 2^-9 of the value) beside float32 sums' error
    assert ((got[0].double() - exact).abs() <= exact.abs() * 2.0 ** -8 + 1e-4).all()
    onednn = torch.nn.functional.linear(x, weight, bias).double()
    assert (got[0].double() - exact).abs().max() <= (onednn - exact).abs().max() + 1e-4


@needs_bf16
def test_fused_packs_bf16_weights_as_panels_and_adds_a_residual_as_torch_does():
    """A bf16 layer's h + linear(x): the product rounded to bf16, then the sum rounded, as torch adds."""
    weight, x, bias = (t.bfloat16() for t in weight_and_rows(48, 32, 9, seed=4))
    h = torch.randn(1, 9, 48, generator=torch.Generator().manual_seed(6)).bfloat16()
    packed = fused.pack(weight)
    assert isinstance(packed, linear_kernel.Panels) and packed.data.dtype == torch.bfloat16
    assert torch.equal(fused.linear(x[None], weight, bias, packed), packed.apply(x[None], bias))
    assert torch.equal(fused.linear(x[None], weight, bias, packed, residual=h), h + packed.apply(x[None], bias))


def test_switched_off_bf16_weights_go_to_onednn(monkeypatch, tmp_path):
    monkeypatch.setenv("KVLIB_BF16_LINEAR", "0")
    monkeypatch.setenv("KVLIB_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(linear_kernel.BF16, "_state", {})
    assert linear_kernel.bf16_status() == "off (KVLIB_BF16_LINEAR=0)"
    weight = weight_and_rows(48, 32, 9, seed=5)[0].bfloat16()
    assert not linear_kernel.takes(weight)
    if fused.can_pack(weight):
        assert not isinstance(fused.pack(weight), linear_kernel.Panels)
