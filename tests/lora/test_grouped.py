"""The per-expert products of the TE grouped adapters (``lora.adapters.grouped.per_expert_linear``: a GEMM per
expert, or for many experts one batched GEMM, ``grouped_rows_linear``) against a float64 loop over the
experts, values and gradients (exact up to float64 round-off: 1e-12)."""

from __future__ import annotations

import pytest
import torch

from lora.adapters.grouped import BATCHED_MIN_EXPERTS, grouped_rows_linear, per_expert_linear


@pytest.mark.parametrize("splits", [[5, 0, 7, 1], [0, 0, 3], [4], [0, 0]])
def test_grouped_rows_linear_matches_a_loop(splits):
    g = torch.Generator().manual_seed(len(splits) + sum(splits))
    x = torch.randn(sum(splits), 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(len(splits), 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = grouped_rows_linear(x, w, splits)
    assert y.shape == (sum(splits), 3)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    parts = [xi @ wr[i].T for i, xi in enumerate(xr.split(splits))]
    ref = torch.cat(parts) if parts else xr.new_zeros(0, 3)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    if sum(splits):
        gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
        (y * gy).sum().backward()
        (ref * gy).sum().backward()
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(w.grad, wr.grad, rtol=1e-12, atol=1e-12)


def test_grouped_rows_linear_rejects_mismatched_splits():
    with pytest.raises(ValueError, match="rows split as"):
        grouped_rows_linear(torch.zeros(5, 2), torch.zeros(2, 3, 2), [2, 2])
    with pytest.raises(ValueError, match="2 weight matrices"):
        grouped_rows_linear(torch.zeros(4, 2), torch.zeros(2, 3, 2), [1, 1, 2])


@pytest.mark.parametrize("n", [3, BATCHED_MIN_EXPERTS + 4])
def test_per_expert_linear_both_paths(n):
    g = torch.Generator().manual_seed(n)
    splits = [int(k) for k in torch.randint(0, 5, (n,), generator=g)]
    splits[0] = 0
    x = torch.randn(sum(splits), 8, generator=g, dtype=torch.float64)
    ws = [torch.randn(5, 8, generator=g, dtype=torch.float64) for _ in range(n)]
    ref = torch.cat([xi @ w.T for xi, w in zip(x.split(splits), ws)])
    torch.testing.assert_close(per_expert_linear(x, ws, splits), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="rows split as"):
        per_expert_linear(x, ws[:-1], splits[:-1] + [splits[-1] + 1])
