"""adakv's Triton GEMV equals torch's linear (GPU; or CPU under TRITON_INTERPRET=1 with triton installed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TRITON_DEVICE, skip_bf16_when_interpreted, triton_test

pytestmark = [pytest.mark.gpu, triton_test]

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("n_features, k_features, bias", [(50, 300, False), (33, 1024, True), (64, 130, True)])
def test_gemv_equals_linear(dtype, rows, n_features, k_features, bias):
    from adakv.kernels.triton_gemv import gemv

    skip_bf16_when_interpreted(dtype)
    generator = torch.Generator().manual_seed(rows * n_features)
    x = torch.randn(2, rows, k_features, generator=generator)[1].to(TRITON_DEVICE, dtype)  # a view with an offset
    weight = torch.randn(n_features, k_features, generator=generator).to(TRITON_DEVICE, dtype)
    b = torch.randn(n_features, generator=generator).to(TRITON_DEVICE, dtype) if bias else None
    for tiles in (None, dict(BLOCK_N=8, BLOCK_K=128, num_warps=4, num_stages=2)):
        out = gemv(x, weight, b, tiles=tiles)
        assert out.shape == (rows, n_features) and out.dtype == dtype
        torch.testing.assert_close(out.float(), F.linear(x.float(), weight.float(), None if b is None else b.float()), **TOLERANCE[dtype])


def test_gemv_keeps_leading_dimensions_and_refuses_bad_input():
    from adakv.kernels.triton_gemv import MAX_ROWS, gemv

    weight = torch.randn(20, 64, device=TRITON_DEVICE)
    x = torch.randn(2, 1, 64, device=TRITON_DEVICE)
    torch.testing.assert_close(gemv(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match=f"1 to {MAX_ROWS} rows"):
        gemv(torch.randn(MAX_ROWS + 1, 64, device=TRITON_DEVICE), weight)
    with pytest.raises(ValueError, match="contiguous"):
        gemv(torch.randn(1, 64, device=TRITON_DEVICE), weight.t().contiguous().t())
    with pytest.raises(ValueError, match="one dtype"):
        gemv(torch.randn(1, 64, device=TRITON_DEVICE, dtype=torch.float64), weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("bias", [False, True])
def test_silu_gated_gemv_equals_silu_mul_of_the_two_halves_of_gemv(dtype, rows, bias):
    """The same accumulation as `gemv` and the same arithmetic as the silu_mul kernel: equal, not merely close."""
    from adakv.kernels.triton_elementwise import silu_mul
    from adakv.kernels.triton_gemv import gemv, silu_gated_gemv

    skip_bf16_when_interpreted(dtype)
    generator = torch.Generator().manual_seed(rows)
    n_out, k_features = 40, 300
    x = torch.randn(rows, k_features, generator=generator).to(TRITON_DEVICE, dtype)
    weight = torch.randn(2 * n_out, k_features, generator=generator).to(TRITON_DEVICE, dtype)
    b = torch.randn(2 * n_out, generator=generator).to(TRITON_DEVICE, dtype) if bias else None
    tiles = dict(BLOCK_N=8, BLOCK_K=128, num_warps=4, num_stages=2)
    gate, up = gemv(x, weight, b, tiles=tiles).chunk(2, dim=-1)
    out = silu_gated_gemv(x, weight, b, tiles=tiles)
    assert out.shape == (rows, n_out) and out.dtype == dtype
    assert torch.equal(out, silu_mul(gate, up))


def test_silu_gated_gemv_refuses_an_odd_number_of_weight_rows():
    from adakv.kernels.triton_gemv import silu_gated_gemv

    with pytest.raises(ValueError, match=r"\(2 \* n, K\) matrix of gate's rows then up's"):
        silu_gated_gemv(torch.randn(1, 64, device=TRITON_DEVICE), torch.randn(21, 64, device=TRITON_DEVICE))
