"""GPTQ for the SVDQuant residual (optional; the default residual quantizer is round-to-nearest).

Quantizes ``R (out × in)`` column by column in the input order, pushing each column's error onto the
columns not yet quantized through the inverse Hessian ``H⁻¹`` of the layer inputs (Frantar et al., 2022):

    H = Xsᵀ·Xs + λ·mean(diag)·I          (Xs = smoothed inputs, i.e. H = diag(1/s)·XᵀX·diag(1/s))
    U = chol(H⁻¹)ᵀ (upper)
    for column j:  q_j = Q(r_j);  e = (r_j − q_j) / U_jj;  r_k −= e·U_jk  for k > j

Scales are fixed when a quantization group starts, from the *current* (error-updated) weights of that
group: NVFP4 block scales against the per-tensor scale of the original ``R``; INT4 multipliers 7/amax.
Codes and scales are packed directly, so ``dequantize`` of the result reproduces the GPTQ values exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from svdq.formats import PackedTensor, QuantFormat, pack_nibbles
from svdq.formats import int4 as int4_fmt
from svdq.formats import nvfp4 as nvfp4_fmt

BLOCK = 128  # columns per lazy-update block (a multiple of every group size)


def gptq_quantize(R: Tensor, H: Tensor, fmt: QuantFormat, damp: float = 0.01) -> tuple[Tensor, PackedTensor]:
    """GPTQ-quantize ``R (out × in, float32)`` with input Hessian ``H (in × in)``.

    Returns ``(R_q, packed)``: the dequantized float32 values and the packed tensor (``dequantize(packed)
    == R_q``). Supports ``nvfp4`` and ``int4``.
    """
    if fmt.name not in ("nvfp4", "int4"):
        raise ValueError(f"GPTQ supports nvfp4 and int4 residuals, not {fmt}")
    W = R.detach().float().clone()
    out_f, in_f = W.shape
    G = fmt.group_size
    H = H.to(W.device, torch.float64).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * H.diagonal().mean() * torch.eye(in_f, dtype=H.dtype, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()

    global_amax = W.abs().amax() if fmt.name == "nvfp4" else None
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=W.device)
    Q = torch.empty_like(W)
    scales = []
    g = None
    for b0 in range(0, in_f, BLOCK):
        b1 = min(b0 + BLOCK, in_f)
        Wb, Ub = W[:, b0:b1].clone(), U[b0:b1, b0:b1]
        Eb = torch.zeros_like(Wb)
        for j in range(b1 - b0):
            col = b0 + j
            if col % G == 0:  # a new group: fix its scale from the current weights
                slab = Wb[:, j : j + G]
                if fmt.name == "nvfp4":
                    block_scale, g = nvfp4_fmt.compute_scales(slab.contiguous(), global_amax)
                    scales.append(block_scale)
                    step = block_scale.float() * g  # (out, 1)
                else:
                    _, m = int4_fmt.encode(slab.contiguous(), G)
                    scales.append(m)
                    step = m.float()  # multiplier (out, 1)
            w = Wb[:, j]
            if fmt.name == "nvfp4":
                c = nvfp4_fmt.e2m1_codes(w / step[:, 0])
                q = nvfp4_fmt.e2m1_values(c) * step[:, 0]
            else:
                qi = torch.round(w * step[:, 0]).clamp(-8, 7)
                qi = torch.where(torch.isnan(qi), torch.zeros_like(qi), qi)  # all-zero group (m = inf)
                c = (qi + 8).to(torch.uint8)
                q = qi / step[:, 0]
                q = torch.where(torch.isnan(q), torch.zeros_like(q), q)
            codes[:, col], Q[:, col] = c, q
            err = (w - q) / Ub[j, j]
            Wb[:, j:] -= err[:, None] * Ub[j, j:][None, :]
            Eb[:, j] = err
        W[:, b1:] -= Eb @ U[b0:b1, b1:]
    scale = torch.cat(scales, dim=1)
    packed = PackedTensor(
        fmt,
        (out_f, in_f),
        torch.float32,
        pack_nibbles(codes, even_low=fmt.name == "nvfp4"),
        scale,
        g if fmt.name == "nvfp4" else None,
    )
    return Q, packed
