"""The C float32 RMSNorm and gated SiLU (engine/pointwise_kernel.py): the formulas in float64
within float32 rounding, batch-invariant, and torch's ops where the kernel is switched off."""

import pytest
import torch

from kvlib.engine import pointwise_kernel

needs_kernel = pytest.mark.skipif(pointwise_kernel.status() != "compiled",
                                  reason=f"pointwise kernel unavailable here: {pointwise_kernel.status()}")


def rows(m, n, seed, scale=1.0):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed)) * scale


@needs_kernel
@pytest.mark.parametrize("m, n", [(1, 576), (25, 576), (300, 64), (7, 45)])  # 45: a tail past the vectors
def test_rms_norm_equals_float64(m, n):
    x, w = rows(m, n, seed=m + n, scale=7.0), rows(1, n, seed=1)[0]
    got = pointwise_kernel.rms_norm(x[None], w, 1e-5)
    xd = x.double()
    expected = w.double() * xd / (xd.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    assert got.shape == (1, m, n)
    torch.testing.assert_close(got[0].double(), expected, rtol=1e-6, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("m, inter", [(1, 1536), (25, 1536), (200, 64), (3, 13)])
def test_silu_mul_equals_float64_over_the_whole_range(m, inter):
    gate_up = rows(m, 2 * inter, seed=m, scale=6.0)
    gate_up[0, :4] = torch.tensor([-200.0, -88.0, 88.0, 200.0])[: min(4, inter)]  # where e^-g over- or underflows
    got = pointwise_kernel.silu_mul(gate_up[None], inter)
    g, u = gate_up[:, :inter].double(), gate_up[:, inter:].double()
    expected = g * torch.sigmoid(g) * u
    assert got.shape == (1, m, inter) and torch.isfinite(got).all()
    torch.testing.assert_close(got[0].double(), expected, rtol=3e-6, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_row_gives_the_same_bits_whatever_rows_share_the_call(threads):
    x, w, gate_up = rows(300, 576, seed=2), rows(1, 576, seed=3)[0], rows(300, 3072, seed=4)
    torch.set_num_threads(threads)
    try:
        norm_alone = pointwise_kernel.rms_norm(x[5:6], w, 1e-6)
        act_alone = pointwise_kernel.silu_mul(gate_up[5:6], 1536)
        for m in (6, 25, 300):  # 300 rows run on the threads
            assert torch.equal(pointwise_kernel.rms_norm(x[:m], w, 1e-6)[5], norm_alone[0]), m
            assert torch.equal(pointwise_kernel.silu_mul(gate_up[:m], 1536)[5], act_alone[0]), m
    finally:
        torch.set_num_threads(2)


def within_a_bf16_rounding(got, expected):
    """got and expected bf16 tensors equal but where one rounding step in bf16 apart: most bits the
    same, the rest one bf16 unit in the last place (relative 2^-8) apart."""
    assert got.dtype == expected.dtype == torch.bfloat16 and got.shape == expected.shape
    same = (got == expected).float().mean().item()
    assert same > 0.97, same
    torch.testing.assert_close(got.float(), expected.float(), rtol=2.0**-7, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("m, n", [(1, 576), (25, 576), (7, 45)])
def test_bf16_rms_norm_is_torchs_bf16_path_within_a_rounding(m, n):
    """forward.norm's torch path in bf16: weight * rms_norm(x in float32) cast back, each product rounded."""
    x, w = rows(m, n, seed=m + n, scale=7.0).bfloat16(), rows(1, n, seed=1)[0].bfloat16()
    got = pointwise_kernel.rms_norm(x[None], w, 1e-5)
    expected = w * torch.nn.functional.rms_norm(x[None].float(), (n,), eps=1e-5).to(torch.bfloat16)
    within_a_bf16_rounding(got, expected)


@needs_kernel
@pytest.mark.parametrize("m, inter", [(1, 1536), (25, 1536), (3, 13)])
def test_bf16_silu_mul_is_torchs_bf16_path_within_a_rounding(m, inter):
    """forward.gated's torch path in bf16: silu(gate) rounded, times up rounded."""
    gate_up = rows(m, 2 * inter, seed=m, scale=6.0).bfloat16()
    got = pointwise_kernel.silu_mul(gate_up[None], inter)
    gate, up = gate_up[None].split(inter, dim=-1)
    within_a_bf16_rounding(got, torch.nn.functional.silu(gate) * up)


def test_other_dtypes_and_shapes_are_declined():
    x = torch.randn(3, 8)
    assert pointwise_kernel.rms_norm(x.double(), torch.ones(8, dtype=torch.float64), 1e-6) is None
    assert pointwise_kernel.rms_norm(x.bfloat16(), torch.ones(8), 1e-6) is None  # mixed dtypes
    assert pointwise_kernel.rms_norm(x, torch.ones(7), 1e-6) is None
    assert pointwise_kernel.silu_mul(x, 3) is None  # 8 columns are not gate and up of 3


def test_switched_off_the_forward_runs_torch(monkeypatch, tmp_path):
    from kvlib.engine.forward import gated

    monkeypatch.setenv("KVLIB_POINTWISE_KERNEL", "0")
    monkeypatch.setenv("KVLIB_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(pointwise_kernel.KERNEL, "_state", {})
    assert pointwise_kernel.status() == "off (KVLIB_POINTWISE_KERNEL=0)"
    assert pointwise_kernel.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6) is None
    gate_up = torch.randn(4, 16)
    assert torch.equal(gated(torch.nn.SiLU(), gate_up, 8), torch.nn.functional.silu(gate_up[:, :8]) * gate_up[:, 8:])
    assert list(tmp_path.iterdir()) == []  # nothing built


def test_a_kernel_is_named_by_its_shared_header_too(monkeypatch, tmp_path):
    """The exponential lives in exp2_avx2.h, the bf16 conversions in bf16_avx2.h: a change there must
    rebuild every kernel that includes it."""
    from kvlib.engine import attn_kernel, rope_kernel
    from kvlib.engine.kernels import CKernel, compiler

    if compiler() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("KVLIB_KERNEL_DIR", str(tmp_path / "built"))

    assert [h.name for h in pointwise_kernel.KERNEL.headers()] == ["bf16_avx2.h", "exp2_avx2.h"]
    assert [h.name for h in attn_kernel.KERNEL.headers()] == ["attn_merge.h", "exp2_avx2.h"]
    bf16_headers = ["attn_merge.h", "exp2_avx2.h", "amx_products.h", "dpbf16_products.h"]
    assert [h.name for h in attn_kernel.AMX.headers()] == [h.name for h in attn_kernel.DPBF16.headers()] == bf16_headers
    assert [h.name for h in rope_kernel.KERNEL.headers()] == ["bf16_avx2.h", "bf16_avx512.h"]
    source = tmp_path / "k.c"
    (tmp_path / "k.h").write_text("#define K 1\n")
    source.write_text('#include "k.h"\nint kvlib_k(void) { return K; }\n')
    kernel = CKernel(source, ("-O2", "-fPIC", "-shared"), "kvlib_k", [], "KVLIB_TEST_K", set())
    first = kernel._build()
    (tmp_path / "k.h").write_text("#define K 2\n")
    rebuilt = CKernel(source, ("-O2", "-fPIC", "-shared"), "kvlib_k", [], "KVLIB_TEST_K", set())._build()
    assert rebuilt._name != first._name
