"""PTQD quantization-noise correction (NeurIPS 2023), applied on the host inside the sampler loop.

The quantized network's prediction is modelled per sampling step t as

    ε̂ = (1 + k_t) · ε + b_t[c] + n,   n ~ N(0, σ_q,t²)                                 (PTQD Eq. 7)

- correlated-noise correction (CNC) divides the correlated part out:   ε ← (ε̂ − b_t) / (1 + k_t)
  (with bias correction (BC) off, b_t is not subtracted). The residual std becomes σ_q' = σ_q/(1 + k).
  Guard (ours, not in the paper): under the same model, CNC leaves an expected squared error of
  σ_q²/(1 + k)² per element, no correction leaves k² E[ε²] + σ_q²; where CNC's is not smaller (k_t near
  −1, where the network has all but lost ε), the step keeps k = 0. `cnc-all` applies CNC at every step.
- minimum-error gain (ours, beyond the paper): under the same model the linear estimate of ε from ε̂ − b_t
  with the least expected squared error is  ε ← c_t (ε̂ − b_t),  c_t = (1 + k_t) E[ε²] / ((1 + k_t)² E[ε²] + σ_q,t²)
  (the Wiener gain). It equals CNC's 1/(1 + k_t) when σ_q,t = 0 and shrinks towards 0 as the residual grows;
  with k_t < 0 (MSE-calibrated engines lose part of ε) it neither amplifies noise like 1/(1 + k_t) nor gives
  up like the guard's k = 0. Its independent residual std is c_t σ_q,t (what VSC absorbs). `gain` replaces `cnc`.
- variance-schedule calibration (VSC) shrinks the sampler's own noise so that the residual quantization
  noise, entering x_prev with the coefficient λ_t of ε in the update, keeps the total variance on the
  schedule:  σ'_t² = σ_t² − λ_t² σ_q'²  if that is ≥ 0, else 0          (supplement Eqs. E–F)
- step-aware mixed precision (PTQD Sec. 4.4, Eq. 15; supplement Table A) runs a cheaper precision on the
  early, noisy steps while its corrected prediction's signal-to-noise ratio, SNR_Q(t) = (1 + k_t)² E[ε²] / σ_q,t²
  (signal ε against the residual std σ_q,t/(1 + k_t) that CNC and BC leave), stays at or above the
  diffusion's own SNR_F(t) = ā_t / (1 − ā_t); from the first step where it falls below, the higher
  precision runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.engine import timestep_key
from runtime.errors import BundleError

COMPONENTS = ("cnc", "gain", "bc", "vsc")
MAX_K, MAX_EPS_STAT = 100.0, 100.0  # bounds on |k_t| and on |b_t|, σ_q,t (units of a unit-variance ε)
CNC_ALL = "cnc-all"  # CNC at every step, the guard off


@dataclass(frozen=True)
class PtqdTables:
    """Per sampling step statistics, rows in the order of `timesteps` (the calibrated sampler's steps)."""

    timesteps: np.ndarray  # (S,) int64
    k: np.ndarray  # (S,) correlation coefficient of Δε on ε_FP
    bias: np.ndarray  # (S, C) per-channel mean of the residual Δε − k·ε_FP
    sigma_q: np.ndarray  # (S,) std of the residual after the bias
    sampler: str
    steps: int
    eta: float
    k_fallback: tuple[int, ...] = ()  # timesteps whose k ≤ −1 was replaced by 0 (no correlated correction)
    eps_power: np.ndarray | None = None  # (S,) mean ε_FP² per element: the signal of SNR_Q
    cnc_off: tuple[int, ...] = ()  # timesteps where CNC would raise the expected error (the guard keeps k = 0)

    @classmethod
    def checked(cls, timesteps, k, bias, sigma_q, *, sampler: str, steps: int, eta: float, channels: int,
                eps_power=None, where: str = "PTQD tables") -> PtqdTables:  # fmt: skip
        """Validated tables: finite, one row per step, `channels` bias columns, σ_q ≥ 0. A k_t ≤ −1 would
        make (1 + k_t) vanish or flip the sign of ε: that step falls back to k = 0, recorded in
        `k_fallback`."""
        ts = np.asarray(timestep_key(np.asarray(timesteps)), np.int64)  # a flow model's float t → its key
        k = np.asarray(k, np.float64)
        bias = np.asarray(bias, np.float64)
        sigma_q = np.asarray(sigma_q, np.float64)
        n = len(ts)
        if n == 0 or len(set(ts.tolist())) != n:
            raise BundleError(f"{where}: timesteps must be non-empty and distinct")
        if k.shape != (n,) or sigma_q.shape != (n,):
            raise BundleError(f"{where}: k {k.shape} and sigma_q {sigma_q.shape} must have one entry per step ({n})")
        if bias.shape != (n, channels):
            raise BundleError(f"{where}: bias {bias.shape} must be (steps, channels) = ({n}, {channels})")
        for name, v in (("k", k), ("bias", bias), ("sigma_q", sigma_q)):
            if not np.isfinite(v).all():
                bad = ts[~np.isfinite(v.reshape(n, -1)).all(1)]
                raise BundleError(f"{where}: {name} is NaN or Inf at timesteps {bad.tolist()}; regather the statistics")
        if (sigma_q < 0).any():
            raise BundleError(f"{where}: sigma_q is negative at timesteps {ts[sigma_q < 0].tolist()}")
        # ε has unit variance: statistics beyond these bounds are not a quantized network's error
        for name, v, bound in (("k", k, MAX_K), ("bias", bias, MAX_EPS_STAT), ("sigma_q", sigma_q, MAX_EPS_STAT)):
            if (np.abs(v) > bound).any():
                bad = ts[(np.abs(v.reshape(n, -1)) > bound).any(1)]
                raise BundleError(f"{where}: |{name}| exceeds {bound:g} at timesteps {bad.tolist()}; regather the "
                                  "statistics")  # fmt: skip
        if eps_power is not None:
            eps_power = np.asarray(eps_power, np.float64)
            if eps_power.shape != (n,) or not np.isfinite(eps_power).all() or (eps_power < 0).any():
                raise BundleError(f"{where}: eps_power must be {n} finite values ≥ 0; regather the statistics")
        fallback = tuple(int(t) for t in ts[k <= -1])
        k = np.where(k <= -1, 0.0, k)
        off = ()
        if eps_power is not None:  # the CNC guard: σ_q²/(1+k)² ≥ k² E[ε²] + σ_q² (Eq. 7's two expected errors)
            worse = (k != 0) & (sigma_q**2 / (1 + k) ** 2 >= k**2 * eps_power + sigma_q**2)
            off = tuple(int(t) for t in ts[worse])
        return cls(ts, k, bias, sigma_q, sampler, int(steps), float(eta), fallback, eps_power, off)

    def row(self, t: int) -> int:
        """The row of timestep t: its own, or the nearest gathered step's (other step counts)."""
        return int(np.abs(self.timesteps - int(t)).argmin())

    def at(self, t: int, guard: bool = True) -> tuple[float, np.ndarray, float]:
        """(k, bias, σ_q) for timestep t; k = 0 at the steps the CNC guard turns off, unless `guard` is False."""
        r = self.row(t)
        k = 0.0 if guard and int(self.timesteps[r]) in self.cnc_off else float(self.k[r])
        return k, self.bias[r], float(self.sigma_q[r])

    def gain(self, t: int) -> float:
        """The minimum-error gain c_t = (1 + k) E[ε²] / ((1 + k)² E[ε²] + σ_q²) of timestep t's row."""
        if self.eps_power is None:
            raise BundleError("PTQD statistics lack eps_power (gathered by an older dqc); regather them for gain")
        r = self.row(t)
        k, power, sq = float(self.k[r]), float(self.eps_power[r]), float(self.sigma_q[r])
        denom = (1 + k) ** 2 * power + sq**2
        return (1 + k) * power / denom if denom > 0 else 1.0

    def snr(self) -> np.ndarray:
        """SNR_Q per gathered step: (1 + k)² E[ε²] / σ_q² (inf where σ_q = 0)."""
        if self.eps_power is None:
            raise BundleError("PTQD statistics lack eps_power (gathered by an older dqc); regather them")
        with np.errstate(divide="ignore"):
            return (1 + self.k) ** 2 * self.eps_power / self.sigma_q**2


@dataclass(frozen=True)
class RoutedPtqd:
    """The statistics of whichever precision serves each timestep (step-aware mixed precision): one
    PtqdTables per precision, and the precision of every training timestep."""

    tables: dict[str, PtqdTables]
    precision_of_t: tuple[str, ...]

    def __post_init__(self) -> None:
        first = next(iter(self.tables.values()))
        for bits, t in self.tables.items():
            if (t.sampler, t.steps, t.eta) != (first.sampler, first.steps, first.eta):
                raise BundleError(
                    f"PTQD statistics of {bits} were gathered for {t.sampler} {t.steps} steps eta {t.eta}, those of "
                    f"the other precision for {first.sampler} {first.steps} steps eta {first.eta}; regather them"
                )
        missing = sorted(set(self.precision_of_t) - set(self.tables))
        if missing:
            raise BundleError(f"no PTQD statistics for {missing}, which serve some steps; regather them")

    @property
    def sampler(self) -> str:
        return next(iter(self.tables.values())).sampler

    @property
    def steps(self) -> int:
        return next(iter(self.tables.values())).steps

    @property
    def k_fallback(self) -> tuple[int, ...]:
        used = set(self.precision_of_t)
        return tuple(sorted(t for bits, tab in self.tables.items() if bits in used for t in tab.k_fallback))

    @property
    def cnc_off(self) -> tuple[int, ...]:
        of = self.precision_of_t
        return tuple(sorted(t for bits, tab in self.tables.items() for t in tab.cnc_off if of[t] == bits))

    def at(self, t: int, guard: bool = True) -> tuple[float, np.ndarray, float]:
        return self.tables[self.precision_of_t[int(t)]].at(t, guard)

    def gain(self, t: int) -> float:
        return self.tables[self.precision_of_t[int(t)]].gain(t)


def diffusion_snr(alphas_cumprod: np.ndarray, timesteps) -> np.ndarray:
    """SNR_F(t) = ā_t / (1 − ā_t): the signal-to-noise ratio of x_t itself."""
    a = np.asarray(alphas_cumprod, np.float64)[np.asarray(timesteps, np.int64)]
    return a / (1 - a)


def state_snr(schedule, keys, steps: int) -> np.ndarray:
    """SNR_F of the sampler's state at each gathered step (its timestep key): ā/(1 − ā) on a diffusion schedule;
    on a flow schedule, x_t = (1 − σ) x_0 + σ ε gives (1 − σ)² / σ², σ of the `steps`-step Euler solver's step
    with that key (docs/ptqd_flow_matching.md, "Step-aware mixed precision")."""
    if getattr(schedule, "kind", None) != "flow":
        return diffusion_snr(schedule.alphas_cumprod, keys)
    from runtime.engine import timestep_key

    ts = schedule.timesteps(steps)
    sigma_of = dict(zip(np.asarray(timestep_key(ts)).tolist(), schedule.sigmas(steps)[: len(ts)].tolist(), strict=True))
    s = np.array([sigma_of[int(k)] for k in keys], np.float64)
    with np.errstate(divide="ignore"):
        return (1 - s) ** 2 / s**2


def switch_timestep(timesteps, snr_low: np.ndarray, snr_f: np.ndarray) -> int:
    """The mixed-precision switch (PTQD Eq. 15): the low precision serves the sampler's steps from the first
    (noisiest) one while SNR_Q,low(t) ≥ SNR_F(t); from the first step where it falls below, the high one.
    Returns the first high-precision step's timestep: steps with t ≥ it run low. A low precision good at
    every step gives 0 (all low); one failing at the first step gives timesteps[0] + 1 (all high)."""
    ts = np.asarray(timesteps, np.int64)
    fails = np.flatnonzero(np.asarray(snr_low) < np.asarray(snr_f))
    if len(fails) == 0:
        return 0
    i = int(fails[0])
    return int(ts[i - 1]) if i > 0 else int(ts[0]) + 1


def correct_eps(eps: np.ndarray, k: float, bias: np.ndarray, *, cnc: bool, bc: bool,
                gain: float | None = None) -> np.ndarray:  # fmt: skip
    """ε ← (ε̂ − b) / (1 + k) with each part switchable, or ε ← gain · (ε̂ − b) when a gain is given;
    bias is per channel (axis 1)."""
    out = eps
    if bc:
        out = out - bias.reshape(1, -1, *[1] * (eps.ndim - 2)).astype(eps.dtype)
    if gain is not None:
        out = out * np.float32(gain)
    elif cnc:
        out = out / np.float32(1.0 + k)
    return out.astype(np.float32, copy=False)


def eps_coefficient(name: str, a_t: float, a_prev: float, sigma: float) -> float:
    """λ_t: the coefficient of ε in the update x_t → x_prev (so a noise n in ε adds λ_t·n to x_prev).

    DDIM: x_prev = √ā_prev x̂_0 + √(1 − ā_prev − σ_t²) ε with x̂_0 = (x_t − √(1−ā_t) ε)/√ā_t, so
    λ_t = √(1 − ā_prev − σ_t²) − √ā_prev √(1 − ā_t)/√ā_t (supplement, before Eq. E, without 1/(1+k):
    the corrected residual std σ_q' carries it). DDPM: the posterior mean's x̂_0 term, c_0 = √ā_prev β/(1 − ā_t),
    gives λ_t = −c_0 √(1 − ā_t)/√ā_t."""
    if name == "ddim":
        return float(np.sqrt(max(1 - a_prev - sigma**2, 0.0)) - np.sqrt(a_prev) * np.sqrt(1 - a_t) / np.sqrt(a_t))
    beta = 1 - a_t / a_prev
    return float(-np.sqrt(a_prev) * beta / (1 - a_t) * np.sqrt(1 - a_t) / np.sqrt(a_t))


def calibrated_sigma(sigma: float, lam: float, sigma_q: float) -> float:
    """σ'_t = √(σ_t² − λ_t² σ_q²) when that is ≥ 0, else 0 (supplement Eq. F); never negative."""
    return float(np.sqrt(max(sigma**2 - lam**2 * sigma_q**2, 0.0)))
