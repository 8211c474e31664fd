"""AdaRound (Nagel et al. 2020): learn, per weight, whether to round down or up.

    W̃ = s · clip(⌊W/s⌋ + h(V), q_min, q_max),   h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1),  ζ = 1.1, γ = −0.1  (eq. 23)
    min_V ‖W̃ x − W x‖² + λ Σ (1 − |2h(V) − 1|^β)                                             (eq. 25)

with β annealed from 20 to 2 after a 20 % warm-up (regulariser off during warm-up), λ = 0.01, Adam
lr 1e-3 (algorithms.md, "AdaRound / BRECQ"). After optimisation h(V) is hardened: round up where V ≥ 0.
This is the layer-wise form; the inputs x are what the layer sees in the network being quantized.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from calibration.quantizers import symmetric_range

ZETA, GAMMA = 1.1, -0.1


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _apply(layer: torch.nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.detach()
    if isinstance(layer, torch.nn.Conv2d):
        return F.conv2d(x, w, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, w, bias)


def adaround_layer(
    layer: torch.nn.Module,
    inputs: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    *,
    iters: int = 1000,
    batch: int = 32,
    lr: float = 1e-3,
    reg_weight: float = 0.01,
    warmup: float = 0.2,
    beta: tuple[float, float] = (20.0, 2.0),
    seed: int = 0,
) -> torch.Tensor:
    """Integer weights (int8 container, b-bit grid) for `layer` (Conv2d or Linear, per-output-channel
    `scale`), learned on `inputs` (N, …) against the layer's full-precision output."""
    qmin, qmax = symmetric_range(bits)
    w = layer.weight.detach().float()
    s = scale.float().reshape([-1] + [1] * (w.ndim - 1))
    w_floor = torch.floor(w / s)
    rest = (w / s - w_floor).clamp(1e-4, 1 - 1e-4)
    v = torch.nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))  # h(V₀) = fractional part
    opt = torch.optim.Adam([v], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        target = _apply(layer, inputs, w)
    for i in range(iters):
        idx = torch.randint(0, len(inputs), (min(batch, len(inputs)),), generator=gen)
        w_soft = s * torch.clamp(w_floor + _h(v), qmin, qmax)
        rec = (_apply(layer, inputs[idx], w_soft) - target[idx]).pow(2).flatten(1).sum(1).mean()
        p = i / max(iters - 1, 1)
        if p < warmup:
            loss = rec
        else:
            b = beta[1] + 0.5 * (beta[0] - beta[1]) * (1 + math.cos(math.pi * (p - warmup) / (1 - warmup)))
            loss = rec + reg_weight * (1 - (2 * _h(v) - 1).abs().pow(b)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return torch.clamp(w_floor + (v >= 0).float(), qmin, qmax).to(torch.int8)
