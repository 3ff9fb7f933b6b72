"""An independent NVFP4 fake quantization with a given per-tensor range, for the static-range tests.

Written from the format definition (svdq/DESIGN.md §2), not from ``svdq.formats``: the scales follow the
definition in float32 (``g = amax / (6·448)``, block scale ``e4m3(clamp(amax_b / (6·g), 2⁻⁹, 448))``), the
scaled values and the result are float64, E2M1 rounding is nearest with ties to the even code, and
magnitudes above 6 saturate.
"""

import torch

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
_TIES_UP = (0.75, 1.75, 3.5)  # midpoints whose even neighbour is the upper code


def nvfp4_fake_quant_ref(x: torch.Tensor, amax: float) -> torch.Tensor:
    """``Q(x)`` in float64 for ``x (..., K)``, ``K`` divisible by 16, per-tensor range ``amax``."""
    shape = x.shape
    xb = x.double().reshape(*shape[:-1], shape[-1] // 16, 16)
    g = torch.tensor(amax, dtype=torch.float32) / (6.0 * 448.0)
    bmax = xb.abs().amax(-1).float()
    sb = bmax / (6.0 * g)
    sb = torch.where(sb == 0, torch.ones_like(sb), sb).clamp(2.0**-9, 448.0)
    scale = sb.to(torch.float8_e4m3fn).double() * g.double()
    y = xb / scale.unsqueeze(-1)
    a = y.abs()
    idx = (a.unsqueeze(-1) - E2M1).abs().argmin(-1)  # first minimum: the lower code on a tie
    for t in _TIES_UP:
        idx = torch.where(a == t, idx + 1, idx)
    q = torch.sign(y) * E2M1[idx] * scale.unsqueeze(-1)
    return q.reshape(shape)
