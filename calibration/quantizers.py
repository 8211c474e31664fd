"""Uniform quantizers: x̂ = s · (clip(round(x/s) + z, q_min, q_max) − z)  (algorithms.md, "Quantizers").

Rounding is half-to-even in torch.round, as in ONNX QuantizeLinear, so fake-quant and engine agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

UINT8 = (0, 255)
INT8 = (-128, 127)


def symmetric_range(bits: int) -> tuple[int, int]:
    """Restricted symmetric grid [−(2^(b−1) − 1), 2^(b−1) − 1] inside an int8 container."""
    q = 2 ** (bits - 1) - 1
    return -q, q


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return (torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


def _channel_view(v: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def minmax_weight_scale(w: torch.Tensor, bits: int, axis: int = 0) -> torch.Tensor:
    """Per-channel symmetric scale covering the channel's max |w| (round-to-nearest, no clipping)."""
    dims = [d for d in range(w.ndim) if d != axis]
    return (w.detach().abs().amax(dim=dims) / symmetric_range(bits)[1]).clamp_min(1e-12).float()


def search_weight_scale(
    w: torch.Tensor, bits: int, axis: int = 0, p: float = 2.4, candidates: int = 80
) -> torch.Tensor:
    """Per-channel symmetric scale: shrink the range by 1 − 0.01·i (i < 80) and keep the factor with the
    least L_p error per channel (Q-Diffusion / PTQD range initialisation)."""
    w = w.detach().double()
    qmin, qmax = symmetric_range(bits)
    dims = [d for d in range(w.ndim) if d != axis]
    amax = w.abs().amax(dim=dims).clamp_min(1e-12)
    best_err = torch.full_like(amax, float("inf"))
    best = amax / qmax
    for i in range(candidates):
        scale = amax * (1 - 0.01 * i) / qmax
        s = _channel_view(scale, w.ndim, axis)
        err = (fake_quant(w, s, torch.zeros(()), qmin, qmax) - w).abs().pow(p).sum(dim=dims)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, scale, best)
    return best.float()


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, bits: int, axis: int = 0) -> torch.Tensor:
    """Integer weights on the b-bit grid, stored as int8."""
    qmin, qmax = symmetric_range(bits)
    s = _channel_view(scale.double(), w.ndim, axis)
    return torch.clamp(torch.round(w.detach().double() / s), qmin, qmax).to(torch.int8)


@dataclass(frozen=True)
class ActParams:
    """Per-tensor activation quantizer: scale, zero point and integer range."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.tensor(self.scale, dtype=x.dtype, device=x.device)
        return fake_quant(
            x, s, torch.tensor(float(self.zero_point), dtype=x.dtype, device=x.device), self.qmin, self.qmax
        )


def activation_params(lo: float, hi: float, signed: bool, bits: int = 8) -> ActParams:
    """Scale and zero point covering [lo, hi] (widened to contain 0, so zero is exact)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if signed:  # zero point 0; at 8 bits the full int8 range, as TensorRT's QuantizeLinear clamps
        qmin, qmax = symmetric_range(bits)
        qmin = -128 if bits == 8 else qmin
        scale = max(abs(lo), abs(hi)) / qmax
        zp = 0
    else:
        qmin, qmax = 0, 2**bits - 1
        scale = (hi - lo) / (qmax - qmin)
        zp = 0 if scale == 0 else int(round(qmin - lo / scale))
    scale = float(torch.tensor(max(scale, 1e-8), dtype=torch.float32))  # exactly representable in float32
    return ActParams(scale, int(min(max(zp, qmin), qmax)), qmin, qmax)


class RangeObserver:
    """Running min/max and a strided subsample of every batch, for min-max or percentile ranges."""

    def __init__(self, keep: int = 16384) -> None:
        self.lo, self.hi, self.keep, self._samples = float("inf"), float("-inf"), keep, []

    def observe(self, x: torch.Tensor) -> None:
        flat = x.detach().flatten().float()
        self.lo = min(self.lo, flat.min().item())
        self.hi = max(self.hi, flat.max().item())
        stride = max(1, flat.numel() // self.keep)
        # a copy: the strided view would keep the whole activation alive (every layer, every batch)
        self._samples.append(flat[::stride].clone().cpu())

    @property
    def seen(self) -> bool:
        return bool(self._samples)

    def range(self, method: str, percentile: float) -> tuple[float, float]:
        if not self._samples:
            raise ValueError("observer saw no data")
        if method == "minmax":
            return self.lo, self.hi
        data = torch.cat(self._samples).double()
        q = torch.tensor([1 - percentile / 100, percentile / 100], dtype=torch.float64)
        lo, hi = torch.quantile(data[: 2**24], q).tolist()
        return lo, hi


def quantize_bias(
    bias: torch.Tensor, input_scale: float, weight_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 bias on the accumulator grid s_in · s_w[c] (what QLinearConv adds), and that scale."""
    scale = torch.tensor(input_scale, dtype=torch.float32) * weight_scale.float()
    q = torch.round(bias.detach().double() / scale.double()).clamp(-(2**31), 2**31 - 1).to(torch.int32)
    return q, scale


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return (torch.round(x) - x).detach() + x


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """x forward (bit-exact), gradient multiplied by g backward."""
    xg = x * g
    return x.detach() + (xg - xg.detach())


class LsqQuantizer(torch.nn.Module):
    """Uniform quantizer with a learnable step size (LSQ, Esser et al. 2020, eq. 1–3):
        x̂ = (clip(⌊x/s⌉ + z, q_min, q_max) − z) · s,
    gradients by the straight-through estimator, so ∂x̂/∂s = ⌊x/s⌉ − x/s inside the range and
    q_min − z / q_max − z outside it; the step's gradient is scaled by g = 1/√(N_x · q_max) (eq. 4).
    `scale` is a scalar (per tensor) or one value per channel along `axis`; the zero point stays fixed."""

    def __init__(self, scale: torch.Tensor, qmin: int, qmax: int, zero_point: float = 0.0, axis: int | None = None):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.as_tensor(scale, dtype=torch.float32).clone())
        self.register_buffer("zero_point", torch.tensor(float(zero_point)))
        self.qmin, self.qmax, self.axis = qmin, qmax, axis

    @classmethod
    def from_params(cls, p: ActParams) -> LsqQuantizer:
        """A per-tensor LSQ quantizer starting at the calibrated activation quantizer `p`."""
        return cls(torch.tensor(p.scale), p.qmin, p.qmax, float(p.zero_point))

    def to_params(self) -> ActParams:
        """The learned per-tensor quantizer as ActParams (step rounded to float32, kept positive)."""
        scale = float(torch.tensor(max(float(self.scale.detach()), 1e-8), dtype=torch.float32))
        return ActParams(scale, int(self.zero_point), self.qmin, self.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel() if self.axis is None else x.numel() // x.shape[self.axis]
        s = _grad_scale(self.scale, 1.0 / (n * max(self.qmax, 1)) ** 0.5).to(x.dtype)
        if self.axis is not None:
            s = _channel_view(s, x.ndim, self.axis)
        z = self.zero_point.to(x.dtype)
        return (torch.clamp(round_ste(x / s) + z, self.qmin, self.qmax) - z) * s
