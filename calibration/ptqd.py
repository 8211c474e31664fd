"""PTQD statistics of one sampling step from paired predictions on the same inputs (PTQD Sec. 4, Eq. 7).

Δε = ε̂ − ε_FP. The correlated part is the least-squares slope of Δε on ε_FP over all elements,
k = ⟨Δε, ε_FP⟩ / ⟨ε_FP, ε_FP⟩; the residual Δε' = Δε − k ε_FP has a per-channel bias b[c] = mean of Δε'
over (samples, positions), and the rest is the residual noise with variance σ_q² = Var(Δε' − b).
(The public PTQD code takes the bias from the total Δε; here it is the residual's, so k and b do not
count the same error twice.)

A flow model's velocity v = ε − x_0 is not zero-mean (its mean is minus the data's), so there the slope through the
origin would count a bias as correlation (k absorbs b·v̄/E[v²]); its k is fitted jointly with the per-channel bias,
the least-squares slope of Δv on v about the channel means (docs/ptqd_flow_matching.md, Eq. 4).
"""

from __future__ import annotations

import numpy as np

from runtime.engine import timestep_key


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

    def result(self, centered: bool = False) -> tuple[float, np.ndarray, float, float]:
        """(k, bias per channel, σ_q, E[ε_FP²]); `centered`: k about the channel means (flow models)."""
        s, n = self.sums, self.count
        ff = s["ff"].sum()
        if centered:
            var = float(np.sum(s["ff"] - s["f"] ** 2 / n))
            k = float(np.sum(s["df"] - s["d"] * s["f"] / n) / var) if var > 0 else 0.0
        else:
            k = float(s["df"].sum() / ff) if ff > 0 else 0.0
        bias = (s["d"] - k * s["f"]) / n  # mean of Δε − k ε_FP per channel
        # Σ (Δε − k ε_FP)² per channel, then the variance about each channel's bias
        resid_sq = s["dd"] - 2 * k * s["df"] + k * k * s["ff"]
        var = float(np.sum(resid_sq - n * bias**2) / (n * len(bias)))
        return k, bias, float(np.sqrt(max(var, 0.0))), float(ff / (n * len(bias)))


def _paired(model, sets: dict, sampler_cfg, *, n: int, seed: int, batch_size: int, progress: bool, consume,
            purpose: str):  # fmt: skip
    """FP trajectories with the deployment sampler, from seed's calibration noise stream for `purpose`; at
    every step each engine set in `sets` predicts on the same x_t as the FP model (guided outputs, as the
    sampler sees them): consume(key, step, ε̂, ε_FP). Returns the sampled timesteps."""
    from calibration.collect import calib_conds
    from runtime.engine import EngineSet, TorchEngine
    from runtime.sampler import _guided_eps, calibration_noise, sample

    if n < 2:
        raise ValueError(f"PTQD statistics: n={n}; need at least 2 samples")

    def observe(i: int, t: int, x: np.ndarray, eps_fp: np.ndarray, cond) -> None:
        for key, es in sets.items():
            consume(key, i, _guided_eps(es.for_timestep(t), x, t, cond, model.null_cond, sampler_cfg.guidance),
                    eps_fp)  # fmt: skip

    fp = EngineSet.single(TorchEngine(model.wrapper(), model.spec))
    run = sample(fp, model.schedule, sampler_cfg, n=n, seed=seed, cond=calib_conds(model, n),
                 null_cond=model.null_cond, batch_size=batch_size, progress=progress, observe=observe,
                 stream=calibration_noise(purpose))  # fmt: skip
    return run.timesteps


def gather(model, engines, sampler_cfg, *, n: int, seed: int, batch_size: int, progress: bool = True):
    """PTQD statistics per sampling step along FP trajectories, on the shipped quantized engines.
    `engines`: one EngineSet, or {precision: EngineSet} to gather several precision variants along the
    same trajectories. Returns validated PtqdTables (a dict of them for a dict of engine sets)."""
    from runtime.ptqd import PtqdTables

    sets = engines if isinstance(engines, dict) else {"": engines}
    channels = model.spec.sample_shape[0]
    steps = len(model.schedule.timesteps(sampler_cfg.steps))
    acc = {key: [StepAccumulator(channels) for _ in range(steps)] for key in sets}
    ts = _paired(model, sets, sampler_cfg, n=n, seed=seed, batch_size=batch_size, progress=progress,
                 consume=lambda key, i, q, fp: acc[key][i].add(q, fp), purpose="ptqd")  # fmt: skip
    out = {}
    centered = model.schedule.prediction_type == "flow"
    for key, rows in acc.items():
        k, bias, sq, power = zip(*(a.result(centered) for a in rows), strict=True)
        out[key] = PtqdTables.checked(ts, k, np.stack(bias), sq, sampler=sampler_cfg.name, steps=sampler_cfg.steps,
                                      eta=sampler_cfg.eta, channels=channels, eps_power=power)  # fmt: skip
    return out if isinstance(engines, dict) else out[""]


def residual_checks(model, engines, tables, sampler_cfg, *, n: int, seed: int, batch_size: int, keep: int = 1000,
                    progress: bool = True) -> dict:  # fmt: skip
    """The statistical checks of PTQD's supplement (Sec. B) on fresh FP trajectories: per step, the residual
    the runtime leaves after CNC and BC, r = Δε − k_t ε_FP − b_t[c] with the bundle's own k_t and b_t, drawn
    at `keep` random elements, tested for normality (scipy.stats.normaltest, D'Agostino–Pearson), with its
    skewness and excess kurtosis; and Pearson's R of Δε with ε_FP. Returns per-step lists."""
    from scipy import stats

    rng = np.random.default_rng(seed)
    steps = len(model.schedule.timesteps(sampler_cfg.steps))
    kept = [[] for _ in range(steps)]
    sums = np.zeros((steps, 3))  # Σ Δε·ε_FP, Σ Δε², Σ ε_FP² for R

    def consume(_key, i: int, q: np.ndarray, fp: np.ndarray) -> None:
        delta = (q.astype(np.float64) - fp).reshape(len(q), q.shape[1], -1)
        f = fp.astype(np.float64).reshape(delta.shape)
        sums[i] += (np.sum(delta * f), np.sum(delta * delta), np.sum(f * f))
        k, bias, _ = tables.at(timestep_key(ts_all[i]))
        resid = delta - k * f - bias.reshape(1, -1, 1)
        take = min(max(1, round(keep * len(q) / n)), resid.size)
        kept[i].append(rng.choice(resid.ravel(), size=take, replace=False))

    ts_all = model.schedule.timesteps(sampler_cfg.steps)
    _paired(model, {"q": engines}, sampler_cfg, n=n, seed=seed, batch_size=batch_size, progress=progress,
            consume=consume, purpose="ptqd-checks")  # fmt: skip
    out = {"timesteps": [int(t) for t in timestep_key(ts_all)], "normaltest_p": [], "skew": [], "excess_kurtosis": [],
           "pearson_r": (sums[:, 0] / np.sqrt(sums[:, 1] * sums[:, 2])).tolist(), "elements_per_step": 0}  # fmt: skip
    for values in kept:
        r = np.concatenate(values)
        out["normaltest_p"].append(float(stats.normaltest(r).pvalue))
        out["skew"].append(float(stats.skew(r)))
        out["excess_kurtosis"].append(float(stats.kurtosis(r)))
        out["elements_per_step"] = len(r)
    return out
