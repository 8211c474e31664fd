"""AdaRound (Nagel et al. 2020): learn, per weight, whether to round down or up.

    W̃ = s · clip(⌊W/s⌋ + h(V), q_min, q_max),   h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1),  ζ = 1.1, γ = −0.1  (eq. 23)
    min_V ‖W̃ x − W x‖² + λ Σ (1 − |2h(V) − 1|^β)                                             (eq. 25)

with β annealed linearly from 20 to 2 after a 20 % warm-up (regulariser off during warm-up; BRECQ's
LinearTempDecay, which hardens the weights steadily to the end), λ = 0.01, Adam
lr 1e-3 (algorithms.md, "AdaRound / BRECQ"). After optimisation h(V) is hardened: round up where V ≥ 0.
`adaround_layer` is the layer-wise form; `calibration.reconstruct` uses the same rounding block by block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from calibration.quantizers import symmetric_range

ZETA, GAMMA = 1.1, -0.1


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def apply_layer(layer: torch.nn.Module, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The Conv2d or Linear `layer` computed with weight `w` and `bias`."""
    if isinstance(layer, torch.nn.Conv2d):
        return F.conv2d(x, w, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, w, bias)


def block_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖·‖² over channels, averaged over samples and positions (BRECQ's lp_loss with p = 2): the scale
    the published λ = 0.01 of the rounding regulariser is set against. Channels are dim 1 of (N, C, H, W)
    and the last dim of (N, C) / (N, tokens, C)."""
    return (out - target).pow(2).sum(1 if out.ndim == 4 else -1).mean()


class AdaRoundWeight(torch.nn.Module):
    """W̃ of eq. 23 for one weight tensor with per-output-channel scales; V starts where h(V) equals the
    fractional part of W/s, so the soft weight starts at the float weight (inside the grid)."""

    def __init__(self, w: torch.Tensor, scale: torch.Tensor, bits: int) -> None:
        super().__init__()
        w = w.detach().float()
        s = scale.detach().float().to(w.device).reshape([-1] + [1] * (w.ndim - 1))
        self.qmin, self.qmax = symmetric_range(bits)
        self.register_buffer("scale", s)
        self.register_buffer("w_floor", torch.floor(w / s))
        rest = (w / s - self.w_floor).clamp(1e-4, 1 - 1e-4)
        self.v = torch.nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def forward(self, hard: bool = False) -> torch.Tensor:
        h = (self.v >= 0).float() if hard else _h(self.v)
        return self.scale * torch.clamp(self.w_floor + h, self.qmin, self.qmax)

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1 - (2 * _h(self.v) - 1).abs().pow(beta)).sum()

    def integer(self) -> torch.Tensor:
        """The hardened integer weights (int8 container, b-bit grid)."""
        with torch.no_grad():
            return torch.clamp(self.w_floor + (self.v >= 0).float(), self.qmin, self.qmax).to(torch.int8)


def annealed_beta(
    i: int, iters: int, warmup: float = 0.2, beta: tuple[float, float] = (20.0, 2.0), schedule: str = "linear"
) -> float | None:
    """β at iteration i: None during the warm-up (no regulariser), then annealed from β₀ to β₁ linearly (BRECQ's
    LinearTempDecay, the default) or on a cosine (`schedule="cosine"`, the schedule before). Measured on
    Q-Diffusion W4A8, reference model, 1000 iterations, held-out N = 500, calibration seeds 0/1/2: linear
    25.00/30.43/23.64 dB, cosine 27.64/25.31/24.31 dB — the calibration seed moves a cell by up to 7 dB and the
    schedules do not differ beyond it (docs/RESULTS.md, issue 16)."""
    if schedule not in ("cosine", "linear"):
        raise ValueError(f"beta schedule {schedule!r}: use cosine or linear")
    p = i / max(iters - 1, 1)
    if p < warmup:
        return None
    rel = (p - warmup) / (1 - warmup)
    if schedule == "linear":
        return beta[1] + (beta[0] - beta[1]) * (1.0 - rel)
    return beta[1] + 0.5 * (beta[0] - beta[1]) * (1 + math.cos(math.pi * rel))


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
    seed: int = 0,
) -> torch.Tensor:
    """Integer weights (int8 container, b-bit grid) for `layer` (Conv2d or Linear, per-output-channel
    `scale`), learned on `inputs` (N, …; a batch draws N-rows, e.g. whole images) against the layer's
    full-precision output."""
    rounding = AdaRoundWeight(layer.weight, scale, bits)
    bias = None if layer.bias is None else layer.bias.detach()
    opt = torch.optim.Adam(rounding.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        target = apply_layer(layer, inputs, layer.weight.detach().float(), bias)
    for i in range(iters):
        idx = torch.randint(0, len(inputs), (min(batch, len(inputs)),), generator=gen)
        rec = block_loss(apply_layer(layer, inputs[idx], rounding(), bias), target[idx])
        beta = annealed_beta(i, iters)
        loss = rec if beta is None else rec + reg_weight * rounding.regulariser(beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return rounding.integer()
