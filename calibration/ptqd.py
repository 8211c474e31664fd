"""PTQD statistics of one sampling step from paired predictions on the same inputs (PTQD Sec. 4, Eq. 7).

Δε = ε̂ − ε_FP. The correlated part is the least-squares slope of Δε on ε_FP over all elements,
k = ⟨Δε, ε_FP⟩ / ⟨ε_FP, ε_FP⟩; the residual Δε' = Δε − k ε_FP has a per-channel bias b[c] = mean of Δε'
over (samples, positions), and the rest is the residual noise with variance σ_q² = Var(Δε' − b).
(The public PTQD code takes the bias from the total Δε; here it is the residual's, so k and b do not
count the same error twice.)
"""

from __future__ import annotations

import numpy as np


def step_statistics(eps_q: np.ndarray, eps_fp: np.ndarray) -> tuple[float, np.ndarray, float]:
    """(k, bias per channel, σ_q) from (N, C, H, W) predictions of the quantized and FP networks."""
    if eps_q.shape != eps_fp.shape or eps_q.ndim < 2:
        raise ValueError(f"predictions must have equal (N, C, ...) shapes, got {eps_q.shape} and {eps_fp.shape}")
    q = eps_q.astype(np.float64)
    fp = eps_fp.astype(np.float64)
    delta = q - fp
    denom = float(np.sum(fp * fp))
    k = float(np.sum(delta * fp) / denom) if denom > 0 else 0.0
    resid = delta - k * fp
    axes = (0, *range(2, resid.ndim))
    bias = resid.mean(axis=axes)
    noise = resid - bias.reshape(1, -1, *[1] * (resid.ndim - 2))
    return k, bias, float(np.sqrt(noise.var()))


class StepAccumulator:
    """The sums behind step_statistics, accumulated batch by batch (per channel, in float64), so the
    statistics of N samples never need all predictions in memory at once."""

    def __init__(self, channels: int) -> None:
        self.sums = {key: np.zeros(channels) for key in ("dd", "df", "ff", "d", "f")}
        self.count = 0  # elements per channel

    def add(self, eps_q: np.ndarray, eps_fp: np.ndarray) -> None:
        q, fp = eps_q.astype(np.float64), eps_fp.astype(np.float64)
        delta = q - fp
        axes = (0, *range(2, q.ndim))
        for key, v in (("dd", delta * delta), ("df", delta * fp), ("ff", fp * fp), ("d", delta), ("f", fp)):
            self.sums[key] += v.sum(axis=axes)
        self.count += q.size // q.shape[1]

    def result(self) -> tuple[float, np.ndarray, float]:
        s, n = self.sums, self.count
        ff = s["ff"].sum()
        k = float(s["df"].sum() / ff) if ff > 0 else 0.0
        bias = (s["d"] - k * s["f"]) / n  # mean of Δε − k ε_FP per channel
        # Σ (Δε − k ε_FP)² per channel, then the variance about each channel's bias
        resid_sq = s["dd"] - 2 * k * s["df"] + k * k * s["ff"]
        var = float(np.sum(resid_sq - n * bias**2) / (n * len(bias)))
        return k, bias, float(np.sqrt(max(var, 0.0)))


def gather(model, engines, sampler_cfg, *, n: int, seed: int, batch_size: int, progress: bool = True):
    """PTQD statistics per sampling step: FP trajectories with the deployment sampler; at every step the
    FP model and the shipped quantized engines run on the same x_t (guided outputs, as the sampler sees
    them). Returns PtqdTables (validated)."""
    from calibration.collect import default_labels
    from runtime.engine import EngineSet, TorchEngine
    from runtime.ptqd import PtqdTables
    from runtime.sampler import _guided_eps, sample

    if n < 2:
        raise ValueError(f"PTQD statistics: n={n}; need at least 2 samples")
    spec = model.spec
    acc = [StepAccumulator(spec.sample_shape[0]) for _ in model.schedule.timesteps(sampler_cfg.steps)]

    def observe(i: int, t: int, x: np.ndarray, eps_fp: np.ndarray, labels) -> None:
        acc[i].add(_guided_eps(engines.for_timestep(t), x, t, labels, model.null_class, sampler_cfg.guidance), eps_fp)

    fp = EngineSet.single(TorchEngine(model.wrapper(), spec))
    run = sample(fp, model.schedule, sampler_cfg, n=n, seed=seed, labels=default_labels(model, n),
                 null_class=model.null_class, batch_size=batch_size, progress=progress, observe=observe)  # fmt: skip
    ts = run.timesteps
    k, bias, sq = zip(*(a.result() for a in acc), strict=True)
    return PtqdTables.checked(ts, k, np.stack(bias), sq, sampler=sampler_cfg.name, steps=sampler_cfg.steps,
                              eta=sampler_cfg.eta, channels=spec.sample_shape[0])  # fmt: skip
